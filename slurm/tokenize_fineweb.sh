#!/usr/bin/env bash
# Pre-tokenize FineWeb (parquet) into datatrove token shards (*.ds, *.ds.index, *.ds.metadata).
# This job is only the driver: `titan-rw tokenize ... --slurm` hands the work to datatrove's
# SlurmPipelineExecutor, which submits its own array of tokenization jobs (and the merge job
# that depends on them) with sbatch from inside this allocation. All arguments after the script
# name go to `titan-rw tokenize` unchanged (see `titan-rw tokenize --help`).
#
#   sbatch slurm/tokenize_fineweb.sh --input hf://datasets/HuggingFaceFW/fineweb/sample/10BT \
#          --output /scratch/$USER/fineweb10bt_tok --tokenizer /path/tokenizer ...
#   TOKENIZE_LOCAL=1 sbatch --cpus-per-task=64 slurm/tokenize_fineweb.sh ...  # one node, no array
#
# Logs: slurm/logs/<job-name>-<job-id>.out for the driver; datatrove writes the array tasks'
# logs under its own logging folder (an option of `titan-rw tokenize`).
#
#SBATCH --job-name=tokenize_fineweb
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Site-specific:
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_CPU_PARTITION
set -uo pipefail

TITAN_RW_ROOT=${TITAN_RW_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$TITAN_RW_ROOT" || exit 2
VENV=${VENV:-$TITAN_RW_ROOT/.venv}
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
export PYTHONUNBUFFERED=1

mode=(--slurm)
if [ "${TOKENIZE_LOCAL:-0}" = 1 ]; then mode=(); fi
# Threads of each tokenizer process: the allocation's CPUs (the local executor splits them).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "[titan_rw] job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: titan-rw tokenize $* ${mode[*]}"
# datatrove skips tasks whose completion marker exists, so a requeued driver resumes the work.
# USR1 (time limit near) and TERM are forwarded to the tokenizer, which stops; on USR1 the job
# is then requeued and picks up the unfinished tasks.
requeue=0
trap 'requeue=1; kill -TERM "$pid" 2>/dev/null || true' USR1
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
titan-rw tokenize "$@" "${mode[@]}" &
pid=$!
rc=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
  rc=$?
done
echo "[titan_rw] titan-rw tokenize exited with $rc"
if [ "$requeue" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"

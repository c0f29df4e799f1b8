#!/usr/bin/env bash
# One machine, N ranks, no Slurm.
#   bash launch/torchrun_single.sh [CONFIG] [--section.key value ...]
#   NPROC_PER_NODE=8 bash launch/torchrun_single.sh train_configs/llama_1p4b.toml
#   NPROC_PER_NODE=2 bash launch/torchrun_single.sh train_configs/debug_cpu.toml --training.steps 20
# Environment: NPROC_PER_NODE (default: number of GPUs, else 2 on CPU), VENV (default ./.venv),
# TRAIN_SCRIPT (a Python file to run instead of -m titan_rw.train).
# Resume: re-run the same command; the trainer resumes from <dump_folder>/checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
default_nproc=2
# shellcheck source=launch/_torchrun_common.sh
source launch/_torchrun_common.sh  # VENV, $config (optional first argument), NPROC_PER_NODE, entry
exec python -m titan_rw.torchrun --standalone --nnodes=1 --nproc-per-node="$NPROC_PER_NODE" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}" \
  "${entry[@]}" --config "$config" "$@"

#!/usr/bin/env bash
# Debug run on CPU: one node, 2 ranks (gloo), the tiny debug model. Tests the whole Slurm path
# (srun -> torchrun c10d rendezvous -> trainer -> checkpoint -> requeue/resume) without GPUs.
#
#   sbatch slurm/debug_cpu.sh                                   # from the repository root
#   sbatch slurm/debug_cpu.sh --training.steps 20               # trainer overrides follow the script
#   sbatch --job-name=dbg2 slurm/debug_cpu.sh                   # new run folder runs/dbg2
#   RUN_DIR=/tmp/x sbatch slurm/debug_cpu.sh                    # explicit run folder
#
#SBATCH --job-name=debug_cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=6G
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -uo pipefail

# sbatch runs a copy of this file from Slurm's spool: find the repo from the submit directory.
# shellcheck source=slurm/common.sh
source "${TITAN_RW_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2

export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
titan_rw_setup
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-40}
titan_rw_launch "${CONFIG:-train_configs/debug_cpu.toml}" "$@"

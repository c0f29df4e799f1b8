#!/usr/bin/env bash
# Llama 1.4B pretraining with online sample reweighting (paper Table 7: global batch 128 x 8192
# tokens, r = 1.0, 100k steps). Default: 4 nodes x 8 GPUs, FSDP over all 32 GPUs.
#
#   mkdir -p slurm/logs   # (already in the repo) logs go to slurm/logs/<job-name>-<job-id>.out
#   sbatch --account=ACC --partition=PART slurm/llama1p4b.sh
#   sbatch --nodes=8 slurm/llama1p4b.sh                       # more nodes: same global batch 128
#   sbatch --job-name=llama1p4b-short slurm/llama1p4b.sh --training.steps 1000   # overrides
#   sbatch --dependency=singleton --job-name=llama1p4b slurm/llama1p4b.sh   # chain: one at a time
#
# Run folder: runs/<job-name>/ (checkpoints, metrics.jsonl, TensorBoard). A requeued job, or a new
# job with the same --job-name, resumes from its newest checkpoint. See docs/cluster.md.
#
#SBATCH --job-name=llama1p4b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Site-specific, uncomment as needed:
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_GPU_PARTITION
##SBATCH --qos=YOUR_QOS
##SBATCH --constraint=h100
set -uo pipefail

# shellcheck source=slurm/common.sh
source "${TITAN_RW_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2

titan_rw_setup
titan_rw_gpu_env
# 1.4B: a DCP save of model + AdamW state is ~16 GB across all ranks; after the USR1 warning
# (180 s before the time limit) allow 150 s to finish the step and save.
export SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-150}
titan_rw_launch "${CONFIG:-train_configs/llama_1p4b.toml}" "$@"

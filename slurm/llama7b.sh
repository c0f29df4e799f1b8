#!/usr/bin/env bash
# Llama 7B pretraining with online sample reweighting (paper Table 7: global batch 128 x 8192
# tokens, r = 2.0, 170k steps). Default: 8 nodes x 8 GPUs, FSDP over all 64 GPUs.
#
#   mkdir -p slurm/logs   # (already in the repo) logs go to slurm/logs/<job-name>-<job-id>.out
#   sbatch --account=ACC --partition=PART slurm/llama7b.sh
#   sbatch --nodes=16 slurm/llama7b.sh                       # more nodes: same global batch 128
#   sbatch --job-name=llama7b-short slurm/llama7b.sh --training.steps 1000   # overrides
#   sbatch --dependency=singleton --job-name=llama7b slurm/llama7b.sh   # chain: one at a time
#
# Run folder: runs/<job-name>/ (checkpoints, metrics.jsonl, TensorBoard). A requeued job, or a new
# job with the same --job-name, resumes from its newest checkpoint. See docs/cluster.md.
#
#SBATCH --job-name=llama7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
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
# 7B: a DCP save of model + AdamW state is ~80 GB across all ranks; after the USR1 warning
# (300 s before the time limit) allow 240 s to finish the step and save.
export SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
titan_rw_launch "${CONFIG:-train_configs/llama_7b.toml}" "$@"

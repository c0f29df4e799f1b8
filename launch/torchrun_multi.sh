#!/usr/bin/env bash
# Several machines without Slurm: run this on every node with the same MASTER_ADDR/NNODES and
# its own NODE_RANK (0 on the node whose address is MASTER_ADDR).
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 bash launch/torchrun_multi.sh train_configs/llama_7b.toml
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 bash launch/torchrun_multi.sh train_configs/llama_7b.toml
# Environment:
#   MASTER_ADDR (required)  address of node 0, reachable from all nodes
#   NNODES (required)       number of nodes;  NODE_RANK (required) this node's index, 0..NNODES-1
#   MASTER_PORT             rendezvous port on node 0 (default 29500)
#   NPROC_PER_NODE          ranks per node (default: GPUs on this node, else 1)
#   VENV, TRAIN_SCRIPT      as in torchrun_single.sh
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  the interface that reaches the other nodes, where a
#                           node has several (tests/test_two_hosts.py sets the gloo one per node)
# The run folder (--job.dump_folder / the config's) must be on storage all nodes share, so that
# DCP checkpoints are complete and a restart of all nodes resumes from them.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
default_nproc=1
# shellcheck source=launch/_torchrun_common.sh
source launch/_torchrun_common.sh  # VENV, $config (optional first argument), NPROC_PER_NODE, entry
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Static rendezvous (torchrun's default when no --rdzv-backend is given): node NODE_RANK's ranks
# are NODE_RANK*NPROC_PER_NODE ... (c10d, which slurm/common.sh uses, would ignore NODE_RANK);
# node 0 hosts the store at MASTER_ADDR:MASTER_PORT and every node must start.
exec python -m titan_rw.torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}" \
  "${entry[@]}" --config "$config" "$@"

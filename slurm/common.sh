# shellcheck shell=bash
# Shared by slurm/*.sh (sourced, not run): environment, run folder, rendezvous, one srun per node
# launching torchrun, and the pre-emption protocol. Read docs/cluster.md first.
#
# Variables a user may set (sbatch --export=ALL,NAME=value or in the environment before sbatch):
#   TITAN_RW_ROOT    repository root (default: the directory sbatch was called from)
#   VENV             virtual environment to activate (default $TITAN_RW_ROOT/.venv, if present)
#   RUNS_ROOT        parent of run folders (default $TITAN_RW_ROOT/runs)
#   RUN_NAME         run folder name (default: the job name, so a requeued or resubmitted job
#                    with the same name resumes from that folder's newest checkpoint)
#   RUN_DIR          the run folder itself (default $RUNS_ROOT/$RUN_NAME)
#   NPROC_PER_NODE   ranks per node (default: GPUs on the node, else 1)
#   MASTER_PORT      c10d rendezvous port on the first node (default 20000 + job id mod 20000)
#   MAX_RESTARTS     torchrun in-place restarts after a worker failure (default 0)
#   SHUTDOWN_TIMEOUT seconds torchrun lets workers save and exit after a signal (default 120)
#   TRAIN_SCRIPT     run this Python file instead of `-m titan_rw.train` (tests use a stand-in)

# ---- repository, environment, run folder -----------------------------------------------------
titan_rw_setup() {
  TITAN_RW_ROOT=${TITAN_RW_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [ ! -d "$TITAN_RW_ROOT/titan_rw" ]; then
    echo "titan_rw: $TITAN_RW_ROOT is not the repository; sbatch from the repo root or set TITAN_RW_ROOT" >&2
    exit 2
  fi
  cd "$TITAN_RW_ROOT" || exit 2
  VENV=${VENV:-$TITAN_RW_ROOT/.venv}
  if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  export PYTHONUNBUFFERED=1

  : "${SLURM_JOB_ID:?not inside a Slurm job (use launch/torchrun_single.sh or torchrun_multi.sh)}"
  RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-titan_rw}}
  RUNS_ROOT=${RUNS_ROOT:-$TITAN_RW_ROOT/runs}
  RUN_DIR=${RUN_DIR:-$RUNS_ROOT/$RUN_NAME}
  mkdir -p "$RUN_DIR"

  # rendezvous on the first node of the allocation (c10d store hosted by its torchrun agent)
  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-1}
  fi
  export TITAN_RW_ROOT RUN_NAME RUN_DIR NNODES MASTER_ADDR MASTER_PORT NPROC_PER_NODE

  local latest
  # a complete DCP checkpoint has its .metadata (written last); the trainer resumes from the newest
  latest=$(find "$RUN_DIR/checkpoint" -mindepth 2 -maxdepth 2 -path '*/step-*/.metadata' 2>/dev/null |
    sed 's|.*/step-\([0-9]*\)/.metadata|\1|' | sort -n | tail -n 1)
  echo "[titan_rw] job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on $NNODES node(s): $SLURM_JOB_NODELIST"
  echo "[titan_rw] run folder $RUN_DIR; newest checkpoint: ${latest:+step-}${latest:-none (fresh start)}"
  echo "[titan_rw] rendezvous $MASTER_ADDR:$MASTER_PORT, $NPROC_PER_NODE rank(s) per node; python $(command -v python)"
}

# ---- launch ---------------------------------------------------------------------------------
# titan_rw_launch CONFIG [--section.key value ...]
# One srun task per node, each running torchrun; waits for it while handling signals:
#   USR1 (sent to this batch shell by `#SBATCH --signal=B:USR1@N`, N s before the time limit):
#        forwarded to the job step; torchrun (--signals-to-handle ...SIGUSR1) passes it to the
#        trainer, which saves a checkpoint and exits; then this script requeues the job.
#   TERM (scancel, scontrol requeue, pre-emption): Slurm signals every process of every step
#        itself, trainer included, and SIGKILLs after KillWait (pre-emption: GraceTime). Not
#        forwarded a second time: torchrun's handler would abort its own graceful shutdown.
titan_rw_launch() {
  local config=$1
  shift
  local -a entry
  if [ -n "${TRAIN_SCRIPT:-}" ]; then entry=("$TRAIN_SCRIPT"); else entry=(-m titan_rw.train); fi
  local logdir=$RUN_DIR/logs/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
  mkdir -p "$logdir"

  _TITAN_RW_REQUEUE=0
  _TITAN_RW_SRUN=
  trap '_titan_rw_on_usr1' USR1
  trap '_titan_rw_on_term TERM' TERM
  trap '_titan_rw_on_term INT' INT

  # every rank's stdout/stderr: $logdir/<node>/<rdzv id>_*/attempt_N/<local rank>/; the job log
  # shows local rank 0 of each node.
  # shellcheck disable=SC2016  # $0, $SLURMD_NODENAME, $@ expand in each node's task
  # srun: one task per node with all the job's CPUs (Slurm 22.05+ does not pass the batch
  # --cpus-per-task to srun: without it torchrun and every rank would share one core).
  srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" --kill-on-bad-exit=1 \
    bash -c 'exec python -m titan_rw.torchrun --log-dir="$0/$SLURMD_NODENAME" "$@"' "$logdir" \
    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}" \
    --tee=3 --local-ranks-filter=0 \
    "${entry[@]}" --config "$config" --job.dump_folder "$RUN_DIR" "$@" &
  _TITAN_RW_SRUN=$!

  # `wait` returns early when a trapped signal arrives; the zombie keeps kill -0 true until reaped
  local rc=0
  while kill -0 "$_TITAN_RW_SRUN" 2>/dev/null; do
    wait "$_TITAN_RW_SRUN"
    rc=$?
  done
  echo "[titan_rw] srun exited with $rc"
  if [ "$_TITAN_RW_REQUEUE" = 1 ]; then
    echo "[titan_rw] time limit near: requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    rc=0
  fi
  return "$rc"
}

_titan_rw_on_usr1() {
  echo "[titan_rw] $(date +%T) USR1: asking the trainer to checkpoint and exit, then requeue"
  _TITAN_RW_REQUEUE=1
  if [ -n "$_TITAN_RW_SRUN" ]; then kill -USR1 "$_TITAN_RW_SRUN" 2>/dev/null || true; fi
}

_titan_rw_on_term() {
  echo "[titan_rw] $(date +%T) $1: job is being stopped (Slurm signals the trainer directly); waiting for it"
}

# ---- NCCL / PyTorch defaults for GPU runs (each overridable from the environment) ------------
titan_rw_gpu_env() {
  # Errors and warnings only; set NCCL_DEBUG=INFO (and NCCL_DEBUG_SUBSYS=INIT,NET) to debug hangs.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Not set here because TorchTitan sets them itself at init (and warns when they differ):
  # TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (abort on a timeout without cleanup, so the flight
  # recorder can dump), TORCH_FR_BUFFER_SIZE / TORCH_NCCL_DUMP_ON_TIMEOUT=1 / TORCH_FR_DUMP_TEMP_FILE
  # under <run>/comm_traces: on a collective timeout every rank dumps what it was doing there.
  # Tune them with --comm.trace_buf_size / --comm.save_traces_folder / --comm.train_timeout_seconds
  # (default 100 s from step 2 on; --comm.init_timeout_seconds, 300 s, until then).
  # FSDP2 frees memory without record_stream (TorchTitan's recommendation).
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  # Fewer OOMs from fragmentation with FSDP's varying all-gather sizes.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # Data-loader/CPU threads per rank: the node's CPUs split across its ranks.
  local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-8}}
  local per_rank=$((cpus / ${NPROC_PER_NODE:-1}))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((per_rank > 0 ? per_rank : 1))}
  # Cluster-specific (leave unset unless NCCL picks the wrong network):
  #   NCCL_SOCKET_IFNAME=ib0 (or the IPoIB / ethernet interface between nodes; '^lo,docker' to exclude)
  #   NCCL_IB_HCA=mlx5      InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP (slow).
  #   NCCL_NET_GDR_LEVEL / NCCL_IB_GID_INDEX=3 (RoCE) per your admins' guidance.
  #   AWS EFA: FI_PROVIDER=efa, FI_EFA_USE_DEVICE_RDMA=1 and the aws-ofi-nccl plugin.
  #   NCCL_NVLS_ENABLE=0 if NVLink SHARP is unsupported on the switch (errors at init on H100/H200).
  # Rendezvous uses the hostname of the first node (MASTER_ADDR); if nodes cannot resolve it,
  # export MASTER_ADDR=<its IP on the fast network> before sbatch.
}

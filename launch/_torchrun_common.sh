# shellcheck shell=bash disable=SC2034  # config, entry: used by the sourcing script
# Sourced by launch/torchrun_single.sh and launch/torchrun_multi.sh (from the repo root, with the
# script's arguments): activates $VENV, takes an optional CONFIG first argument into $config (the rest
# stays in "$@"), sets NPROC_PER_NODE (default: GPUs, else $default_nproc) and the entry point.
VENV=${VENV:-.venv}
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
config=train_configs/debug_cpu.toml
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then config=$1; shift; fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or ${default_nproc:-1})")
fi
entry=(-m titan_rw.train)
if [ -n "${TRAIN_SCRIPT:-}" ]; then entry=("$TRAIN_SCRIPT"); fi
export PYTHONUNBUFFERED=1

#!/usr/bin/env bash
# Set up titan_rw in a virtual environment (default ./.venv; override with VENV=path).
# The torch it finds is kept, always: its exact version is pinned in the pip call, so no
# dependency can swap it (on a cluster: create the venv with your CUDA torch first, or point VENV
# at an environment that has it). A torch outside pyproject.toml's range (launch/torch_range.py)
# is refused in one line, exit 1, before pip runs: the environment is left as it was. Only an
# environment without torch gets one: the CPU build torch==2.13.0 (from local disk here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEFAULT_TORCH=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
rc=0
have=$("$py" launch/torch_range.py "$VENV") || rc=$?
if [ "$rc" = 0 ]; then
  echo "[setup] torch $have already present: keeping it"
elif [ "$rc" = 3 ]; then
  echo "[setup] no torch in $VENV: installing torch==$DEFAULT_TORCH"
  "$py" -m pip install --quiet "torch==$DEFAULT_TORCH" 2> >(grep -v "is ignored" >&2)
  have=$("$py" launch/torch_range.py "$VENV")
else
  exit 1  # torch_range.py said why, in one line
fi
echo "[setup] installing titan_rw and its dependencies (torch held at $have)"
"$py" -m pip install --quiet -e ".[test]" "torch==$have" 2> >(grep -v "is ignored" >&2)
now=$("$py" launch/torch_range.py "$VENV")
if [ "$now" != "$have" ]; then
  echo "[setup] pip replaced torch $have with $now in $VENV (it was pinned): report this" >&2
  exit 1
fi
"$py" -c "import titan_rw, torch; print(f'[setup] ready: titan_rw {titan_rw.__version__}, torch {torch.__version__}')"

#!/usr/bin/env bash
# Set up titan_rw in a virtual environment (default ./.venv; override with VENV=path).
# torch is installed only when the environment has none: here that takes the CPU build
# torch==2.13.0 from local disk; on a cluster, create the venv with your CUDA torch first
# (or point VENV at an environment that has it) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
if "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] torch $("$py" -c 'import torch; print(torch.__version__)') already present: keeping it"
else
  echo "[setup] no torch in $VENV: installing torch==2.13.0"
  "$py" -m pip install --quiet "torch==2.13.0" 2> >(grep -v "is ignored" >&2)
fi
echo "[setup] installing titan_rw and its dependencies"
"$py" -m pip install --quiet -e ".[test]" 2> >(grep -v "is ignored" >&2)
"$py" -c "import titan_rw, torch; print(f'[setup] ready: titan_rw {titan_rw.__version__}, torch {torch.__version__}')"

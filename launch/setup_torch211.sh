#!/usr/bin/env bash
# A second environment on torch 2.11.0 (default ./.venv-torch211; override with VENV=path) for the
# torch-2.11 smoke test (tests/test_torch211.py), which finds it through TITAN_RW_TORCH211_PYTHON.
# torch==2.11.0 comes from PyPI: a CUDA build (~3 GB with its nvidia wheels) that runs on CPU too.
# torch is installed first and pinned while titan_rw is installed, so pip cannot swap it.
# Called by .ci/run; idempotent (an environment that already has torch 2.11.0 is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-torch211}
PYTHON=${PYTHON:-python3}
TORCH=2.11.0

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_torch211] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
have=$("$py" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$have" != "$TORCH" ]; then
  echo "[setup_torch211] installing torch==$TORCH into $VENV (a few minutes)"
  "$py" -m pip install --quiet "torch==$TORCH" 2> >(grep -v "is ignored" >&2)
fi
echo "[setup_torch211] installing titan_rw with torch held at $TORCH"
"$py" -m pip install --quiet -e . "torch==$TORCH" 2> >(grep -v "is ignored" >&2)
"$py" - "$TORCH" <<'PY'
import sys
import torch, torchtitan, titan_rw  # titan_rw's compat shims make torchtitan import on 2.11
want = sys.argv[1]
got = torch.__version__.split("+")[0]
if got != want:
    sys.exit(f"[setup_torch211] pip replaced torch: {torch.__version__}, wanted {want}")
print(f"[setup_torch211] ready: {sys.executable} (torch {torch.__version__}, titan_rw {titan_rw.__version__})")
PY

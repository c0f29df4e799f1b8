#!/usr/bin/env bash
# An extra environment on another torch, for the smokes that check titan_rw on it against the main
# environment (tests/test_torch211.py, tests/test_torch215.py; they find it through
# TITAN_RW_TORCH<MAJOR><MINOR>_PYTHON):
#   bash launch/setup_torch_env.sh 2.11.0    # -> ./.venv-torch211 (override with VENV=path)
#   PIP_CONFIG_FILE=/dev/null bash launch/setup_torch_env.sh 2.15.0   # -> ./.venv-torch215
# torch==VERSION comes from PyPI: a CUDA build (~3 GB with its nvidia wheels) that runs on CPU too.
# Then launch/setup.sh installs titan_rw (and the test extra) with that torch pinned. This machine's
# pip config caps torch at 2.14.1 (/etc/xdg/pip): PIP_CONFIG_FILE=/dev/null lifts it for 2.15.
# Called by .ci/run; idempotent (an environment that already has torch VERSION is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:?usage: bash launch/setup_torch_env.sh VERSION (e.g. 2.11.0 or 2.15.0)}
VENV=${VENV:-.venv-torch$(echo "$TORCH" | cut -d. -f1,2 | tr -d .)}
PYTHON=${PYTHON:-python3}
me="[setup_torch_env $TORCH]"

if [ ! -x "$VENV/bin/python" ]; then
  echo "$me creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
have=$("$py" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])" 2>/dev/null || true)
if [ "$have" != "$TORCH" ]; then
  echo "$me installing torch==$TORCH into $VENV (a few minutes)"
  "$py" -m pip install --quiet "torch==$TORCH" 2> >(grep -v "is ignored" >&2)
fi
VENV="$VENV" PYTHON="$PYTHON" bash launch/setup.sh
"$py" - "$TORCH" "$me" <<'PY'
import sys
import torch, torchtitan, titan_rw  # titan_rw's compat patches make torchtitan import on this torch
want, me = sys.argv[1], sys.argv[2]
got = torch.__version__.split("+")[0]
if got != want:
    sys.exit(f"{me} pip replaced torch: {torch.__version__}, wanted {want}")
print(f"{me} ready: {sys.executable} (torch {torch.__version__}, titan_rw {titan_rw.__version__}, "
      f"patches: {', '.join(titan_rw.compat.applied_patches()) or 'none'})")
PY

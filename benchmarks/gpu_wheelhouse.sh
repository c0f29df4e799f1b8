#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a GPU machine that has Python and a CUDA torch but no
# network (e.g. Python 3.12 with torch 2.11.0+cu130 preinstalled): TorchTitan and what its imports on
# titan_rw's path need, titan_rw's own imports; never torch or its own dependencies (triton, nvidia-*,
# sympy, networkx, jinja2, filelock, fsspec, typing_extensions, setuptools), which such a machine has.
# Run it where the package registry is reachable; carry the folder (< 64 MiB) with the repo, and
# gpu_check.sh installs from it (pip --no-index --no-deps --target) whatever its imports lack.
#
#   benchmarks/gpu_wheelhouse.sh [DIR]        # default .gpu_wheelhouse (git-ignored)
#
# Environment: PY_VERSION (3.12), PLATFORM (manylinux_2_28_x86_64; older manylinux tags accepted too),
# PIP (python3 -m pip), MAX_MIB (64). The versions are the ones titan_rw is tested with.
# Not here, on purpose: pyarrow (55 MB for CPython 3.12) and Hugging Face `datasets` with pandas &c.
# Only TorchTitan's HF loader uses `datasets` (titan_rw.compat lets it import without); titan_rw reads
# parquet with pyarrow, so the embedded corpus travels tokenized instead: DIR/corpus holds its train
# split as token shards (titan-rw tokenize, the shipped tokenizer; no provenance sidecars, which are
# parquet), and gpu_check.sh trains on them when pyarrow is missing. Tokenizing needs this repo set up
# here (TITAN_PY, default .venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR="${1:-.gpu_wheelhouse}"
PY_VERSION="${PY_VERSION:-3.12}"
PLATFORM="${PLATFORM:-manylinux_2_28_x86_64}"
MAX_MIB="${MAX_MIB:-64}"
read -r -a PIP <<< "${PIP:-python3 -m pip}"
TITAN_PY="${TITAN_PY:-.venv/bin/python}"
abi="cp${PY_VERSION/./}"

# distribution==version: what the training path imports (import name in the comment where it differs)
WHEELS=(
    torchtitan==0.3.0
    spmd_types==0.2.3
    torchdata==0.11.0
    tyro==1.0.17                 # TorchTitan's config manager
    docstring_parser==0.18.0     # tyro
    typeguard==4.6.1             # tyro
    tensorboard==2.21.0          # torch.utils.tensorboard, imported by TorchTitan's metrics
    protobuf==7.36.2             # google.protobuf (tensorboard)
    absl-py==2.5.1               # absl (tensorboard)
    six==1.17.0                  # tensorboard
    packaging==26.4              # tensorboard
    numpy==2.4.6
    sentencepiece==0.2.3         # titan_rw's tokenizer
    tokenizers==0.23.3           # TorchTitan's tokenizer module
    torchao==0.18.0              # the float8 run only ([float8]; an abi3 wheel, 3.4 MB)
)

if [[ "$PY_VERSION" != 3.* ]]; then
    echo "gpu_wheelhouse: PY_VERSION must look like 3.12, got '$PY_VERSION'" >&2
    exit 1
fi
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
platforms=(--platform "$PLATFORM")
for tag in manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    [[ "$tag" == "$PLATFORM" ]] || platforms+=(--platform "$tag")
done
echo "gpu_wheelhouse: ${#WHEELS[@]} wheels for CPython $PY_VERSION ($PLATFORM) -> $DIR"
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --abi "$abi" --abi abi3 --abi none "${platforms[@]}" --platform any -d "$DIR" "${WHEELS[@]}" \
    2> >(grep -v "is ignored" >&2)

n=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
if [[ "$n" -ne ${#WHEELS[@]} ]]; then
    echo "gpu_wheelhouse: expected ${#WHEELS[@]} wheels, got $n in $DIR" >&2
    exit 1
fi
if find "$DIR" -maxdepth 1 -iname 'torch-*.whl' | grep -q .; then
    echo "gpu_wheelhouse: a torch wheel landed in $DIR; torch must come from the GPU machine" >&2
    exit 1
fi

echo "gpu_wheelhouse: the embedded corpus as token shards -> $DIR/corpus"
rm -rf "$DIR/corpus"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$TITAN_PY" -m titan_rw.cli tokenize \
    --input titan_rw/assets/corpus/train --output "$DIR/corpus" --workers 1 --no-progress > "$DIR/tokenize.log" 2>&1 \
    || { tail -5 "$DIR/tokenize.log" >&2; echo "gpu_wheelhouse: tokenizing the corpus failed (log $DIR/tokenize.log)" >&2; exit 1; }
rm -rf "$DIR/corpus/.datatrove" "$DIR"/corpus/*.ds.docs
if ! find "$DIR/corpus" -name '*.ds' | grep -q .; then
    echo "gpu_wheelhouse: no token shards in $DIR/corpus" >&2
    exit 1
fi

bytes=$(du -sb "$DIR" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -1 "$DIR" "$DIR/corpus"
echo "gpu_wheelhouse: $n wheels and the tokenized corpus, $bytes bytes (${mib} MiB) in $DIR"
if (( bytes > MAX_MIB * 1048576 )); then
    echo "gpu_wheelhouse: over the ${MAX_MIB} MiB a GPU machine takes" >&2
    exit 1
fi

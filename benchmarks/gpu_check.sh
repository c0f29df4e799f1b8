#!/usr/bin/env bash
# GPU check, in two parts, sized for at most 10 minutes of wall time on one GPU, compile included
# (docs/performance.md says how):
#   1. a smoke (~1 min): the debug flavor, eager, 5 steps through the real trainer with document-level
#      weights (SMOKE_GRANULARITY): finite losses, weights summing to 1 per group, no CUDA-graph capture
#      of the step, the document mask on (on GPU TorchTitan's FlexAttention document mask); the check
#      stops here when it fails;
#   2. the Llama 1.4B flavor, a few compiled bf16 steps with FSDP on every visible GPU, through
#      benchmarks/gpu_step.py (a timer around train_step), four runs of the same model and config:
#      titan_rw uniform, titan_rw LinUpper, titan_rw LinUpper with [float8] (recipe FLOAT8_RECIPE;
#      left out, with one line, without torchao or an SM89+ GPU), and stock TorchTitan (its own
#      Trainer with its ChunkedLossWrapper mean loss). Prints tokens/s/GPU, MFU (TorchTitan's
#      definition), peak memory and the ratios LinUpper / uniform, uniform / stock, float8 / bf16.
#
#   benchmarks/gpu_check.sh [OUT_DIR] [--section.key value ...]
#
# Needs: Python with a CUDA torch 2.11-2.15 (pyproject.toml's range), the repo, and titan_rw's imports. On a machine without
# network whose Python has torch but not TorchTitan &c.: carry the folder benchmarks/gpu_wheelhouse.sh
# made (WHEELHOUSE, default .gpu_wheelhouse) and this script installs from it what the imports lack
# (pip --no-index --no-deps --target SITE, default .gpu_site, put on PYTHONPATH); never torch.
# Data: the embedded corpus (train_configs/llama_1p4b.toml's default loader).
# Environment knobs (defaults): NPROC (nvidia-smi -L | wc -l), CONFIG (train_configs/llama_1p4b.toml),
# STEPS (8), WARMUP (3: steps not timed: compilation), SEQ (8192), LOCAL_BATCH (2),
# RUN_TIMEOUT (115 s per 1.4B run), SMOKE (1: run the smoke first; 0: skip it), SMOKE_CONFIG
# (train_configs/debug_cpu.toml), SMOKE_STEPS (5), SMOKE_SEQ (2048), SMOKE_TIMEOUT (90 s),
# SMOKE_GRANULARITY (document; or row), FLOAT8_RECIPE (rowwise; or rowwise_with_gw_hp),
# FLOAT8_EMULATE (0; 1: the float8 run emulated, for plumbing tests on CPU),
# PYTHON (python), WHEELHOUSE, SITE, ALLOW_CPU (0; 1: run on a torch without CUDA, for plumbing tests).
# Extra --section.key value arguments go to the 1.4B runs after ours (they win), e.g.
# `--activation_checkpoint.mode full`.
# Exit status: 0 when the smoke passed and every 1.4B run produced a result, 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
    # shellcheck source=/dev/null
    source .venv/bin/activate
fi

OUT="${1:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}"
if [[ $# -gt 0 ]]; then shift; fi
PYTHON="${PYTHON:-python}"
CONFIG="${CONFIG:-train_configs/llama_1p4b.toml}"
STEPS="${STEPS:-8}"
WARMUP="${WARMUP:-3}"
SEQ="${SEQ:-8192}"
LOCAL_BATCH="${LOCAL_BATCH:-2}"
RUN_TIMEOUT="${RUN_TIMEOUT:-115}"
SMOKE="${SMOKE:-1}"
SMOKE_CONFIG="${SMOKE_CONFIG:-train_configs/debug_cpu.toml}"
SMOKE_STEPS="${SMOKE_STEPS:-5}"
SMOKE_SEQ="${SMOKE_SEQ:-2048}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-90}"
SMOKE_GRANULARITY="${SMOKE_GRANULARITY:-document}"
FLOAT8_RECIPE="${FLOAT8_RECIPE:-rowwise}"
FLOAT8_EMULATE="${FLOAT8_EMULATE:-0}"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/.gpu_wheelhouse}"
SITE="${SITE:-$ROOT/.gpu_site}"
ALLOW_CPU="${ALLOW_CPU:-0}"

# torch: present, in pyproject.toml's range (launch/torch_range.py), with CUDA (one line when not)
if ! "$PYTHON" - "$ALLOW_CPU" "$ROOT" <<'EOF'
import sys
sys.path.insert(0, sys.argv[2] + "/launch")
from torch_range import declared, inside
try:
    import torch
except Exception as e:  # noqa: BLE001
    sys.exit(f"gpu_check: unusable torch: {sys.executable} cannot import torch ({type(e).__name__}: {e}); "
             f"install a CUDA torch{declared()} first (it cannot travel in the wheelhouse)")
if not inside(torch.__version__):
    sys.exit(f"gpu_check: unusable torch: {torch.__version__} is outside the range titan_rw supports "
             f"(torch{declared()}, pyproject.toml)")
if sys.argv[1] != "1" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: unusable torch: {torch.__version__} sees no CUDA device (built for CUDA "
             f"{torch.version.cuda}); set ALLOW_CPU=1 only to test this script's plumbing")
EOF
then
    exit 1
fi

# titan_rw's imports: install what is missing from the wheelhouse
IMPORTS='import titan_rw, titan_rw.config, titan_rw.trainer, titan_rw.data.loader, torchtitan.trainer, torch.utils.tensorboard'
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "$IMPORTS" >/dev/null 2>&1; then
    shopt -s nullglob
    wheels=("$WHEELHOUSE"/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -eq 0 ]]; then
        err=$("$PYTHON" -c "$IMPORTS" 2>&1 || true)
        echo "gpu_check: titan_rw's imports fail ($(echo "$err" | tail -1)) and there is no wheelhouse at $WHEELHOUSE (make one with benchmarks/gpu_wheelhouse.sh)" >&2
        exit 1
    fi
    # only the distributions this Python lacks (it keeps its own numpy, protobuf, ...)
    mapfile -t missing < <("$PYTHON" - "${wheels[@]}" <<'EOF'
import importlib.metadata as md, os, re, sys
for w in sys.argv[1:]:
    name = os.path.basename(w).split("-")[0]
    try:
        md.version(re.sub(r"[-_.]+", "-", name))
    except md.PackageNotFoundError:
        print(w)
EOF
    )
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "gpu_check: installing ${#missing[@]} wheel(s) from $WHEELHOUSE into $SITE"
        mkdir -p "$SITE"
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "${missing[@]}"
        else  # no pip: a wheel is a zip of its import tree
            for w in "${missing[@]}"; do "$PYTHON" -m zipfile -e "$w" "$SITE"; done
        fi
    fi
    if ! err=$("$PYTHON" -c "$IMPORTS" 2>&1); then
        echo "gpu_check: titan_rw's imports still fail after the wheelhouse: $(echo "$err" | tail -1)" >&2
        exit 1
    fi
fi

# torchao, for the float8 run only: from the wheelhouse when this Python lacks it (the block above
# installs it too when it ran)
if ! "$PYTHON" -c 'import torchao' >/dev/null 2>&1; then
    shopt -s nullglob
    ao=("$WHEELHOUSE"/torchao-*.whl)
    shopt -u nullglob
    if [[ ${#ao[@]} -gt 0 ]]; then
        echo "gpu_check: installing ${ao[0]##*/} from $WHEELHOUSE into $SITE (the float8 run)"
        mkdir -p "$SITE"
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "${ao[0]}"
        else
            "$PYTHON" -m zipfile -e "${ao[0]}" "$SITE"
        fi
    fi
fi

# titan_rw reads the embedded corpus (parquet) with pyarrow; without it, the wheelhouse's token shards
DATA_ARGS=()
if ! "$PYTHON" -c 'import pyarrow' >/dev/null 2>&1; then
    if ! find "$WHEELHOUSE/corpus" -name '*.ds' 2>/dev/null | grep -q .; then
        echo "gpu_check: no pyarrow to read the embedded corpus and no token shards in $WHEELHOUSE/corpus (benchmarks/gpu_wheelhouse.sh makes them)" >&2
        exit 1
    fi
    echo "gpu_check: no pyarrow: training on the embedded corpus tokenized in $WHEELHOUSE/corpus"
    DATA_ARGS=(--data.dataset_path "$WHEELHOUSE/corpus")
fi

if [[ -z "${NPROC:-}" ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu_check: nvidia-smi not found; set NPROC to run anyway" >&2
        exit 1
    fi
    NPROC="$(nvidia-smi -L | wc -l)"
fi
if [[ "$NPROC" -lt 1 ]]; then
    echo "gpu_check: no GPU visible (nvidia-smi -L lists none)" >&2
    exit 1
fi
if (( STEPS <= WARMUP )); then
    echo "gpu_check: STEPS ($STEPS) must exceed WARMUP ($WARMUP)" >&2
    exit 1
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1
# one compile cache for all runs: the LinUpper run reuses the uniform run's compiled blocks
TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(cd "$OUT" && pwd)/inductor_cache}"
export TORCHINDUCTOR_CACHE_DIR

echo "gpu_check: $NPROC process(es), $CONFIG, $STEPS steps ($WARMUP untimed), seq $SEQ, local batch $LOCAL_BATCH -> $OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
fi
"$PYTHON" -c 'import torch, torchtitan; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchtitan", getattr(torchtitan, "__version__", "?"))' || true

if [[ "$SMOKE" == 1 ]]; then
    port=$(( 29500 + RANDOM % 2000 ))
    echo "=== smoke: $SMOKE_CONFIG, eager, $SMOKE_STEPS steps, seq $SMOKE_SEQ (timeout ${SMOKE_TIMEOUT}s, log $OUT/smoke.log)"
    rm -f "$OUT/smoke.json"
    set +e
    timeout --signal=TERM --kill-after=10 "$SMOKE_TIMEOUT" \
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" --master_port="$port" \
        benchmarks/gpu_step.py --smoke --config "$SMOKE_CONFIG" --warmup 1 --out "$OUT/smoke.json" \
        --job.dump_folder "$OUT/smoke" \
        --training.steps "$SMOKE_STEPS" \
        --training.seq_len "$SMOKE_SEQ" \
        --training.local_batch_size 4 \
        --training.global_batch_size "$(( 8 * NPROC ))" \
        --reweight.warmup_steps 0 \
        --reweight.granularity "$SMOKE_GRANULARITY" \
        --logging.log_interval 1 \
        --compile.enable false \
        --checkpoint.enable false \
        --metrics.enable_tensorboard false \
        ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} > "$OUT/smoke.log" 2>&1
    rc=$?
    set -e
    if ! "$PYTHON" - "$OUT/smoke.json" "$rc" <<'EOF'
import json, os, sys

path, rc = sys.argv[1], int(sys.argv[2])
if not os.path.exists(path):
    sys.exit(f"gpu_check: smoke produced no result (exit {rc}); see {os.path.dirname(path)}/smoke.log")
with open(path) as fh:
    s = json.load(fh)["smoke"]
for name, c in s.items():
    if not isinstance(c, dict):
        continue
    detail = {k: v for k, v in c.items() if k not in ("ok", "required", "sums", "logged_losses")}
    tag = "ok" if c["ok"] else ("FAILED" if c.get("required", True) else "failed (not required here)")
    print(f"smoke: {name:17s} {tag}  {json.dumps(detail)}")
if not s["ok"] or rc != 0:
    sys.exit(f"gpu_check: smoke FAILED (exit {rc}); see {os.path.dirname(path)}/smoke.log")
print("smoke: ok")
EOF
    then
        exit 1
    fi
fi

# the 1.4B runs: name, then its own arguments (before the caller's, which win)
RUNS=(uniform linupper float8 torchtitan)
run_args() {
    case "$1" in
        uniform) echo "--reweight.strategy uniform" ;;
        linupper) echo "--reweight.strategy linupper" ;;
        float8) echo "--reweight.strategy linupper --float8.enable true --float8.recipe_name $FLOAT8_RECIPE $FLOAT8_EXTRA" ;;
        torchtitan) echo "--stock --reweight.strategy uniform" ;;
    esac
}
FLOAT8_EXTRA=""
if [[ "$FLOAT8_EMULATE" == 1 ]]; then
    FLOAT8_EXTRA="--float8.emulate true"
elif ! "$PYTHON" -c 'import sys, torchao, titan_rw.float8 as f; sys.exit(0 if f.torchao_available() and f.float8_hardware() else 1)' 2>/dev/null; then
    echo "gpu_check: float8 run left out: it needs torchao (pip install 'titan_rw[float8]', or the wheelhouse) and an NVIDIA GPU of SM89+ (H100/H200/L40S) or an AMD MI300"
    RUNS=(uniform linupper torchtitan)
fi

failed=0
for name in "${RUNS[@]}"; do
    port=$(( 29500 + RANDOM % 2000 ))
    echo "=== $name (timeout ${RUN_TIMEOUT}s, log $OUT/$name.log)"
    rm -f "$OUT/$name.json"
    read -r -a own <<< "$(run_args "$name")"
    set +e
    timeout --signal=TERM --kill-after=10 "$RUN_TIMEOUT" \
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" --master_port="$port" \
        benchmarks/gpu_step.py --config "$CONFIG" --warmup "$WARMUP" --out "$OUT/$name.json" --label "$name" \
        --job.dump_folder "$OUT/$name" \
        --training.steps "$STEPS" \
        --training.seq_len "$SEQ" \
        --training.local_batch_size "$LOCAL_BATCH" \
        --training.global_batch_size "$(( LOCAL_BATCH * NPROC ))" \
        --lr_scheduler.warmup_steps 2 \
        --reweight.warmup_steps 0 \
        --logging.log_interval 5 \
        --parallelism.data_parallel_shard_degree -1 \
        --compile.enable true \
        --training.mixed_precision_param bfloat16 \
        --checkpoint.enable false \
        --metrics.enable_tensorboard false \
        ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} \
        "${own[@]}" \
        "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc -ne 0 || ! -s "$OUT/$name.json" ]]; then
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            echo "gpu_check: $name timed out after ${RUN_TIMEOUT}s" >&2
        else
            echo "gpu_check: $name failed (exit $rc); see $OUT/$name.log" >&2
        fi
        failed=1
    fi
done

"$PYTHON" - "$OUT" "${RUNS[@]}" <<'EOF'
import json, os, sys

out, names = sys.argv[1], sys.argv[2:]
res = {}
for s in names:
    p = os.path.join(out, f"{s}.json")
    if os.path.exists(p):
        with open(p) as fh:
            res[s] = json.load(fh)


def f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


what = {"uniform": "titan_rw uniform", "linupper": "titan_rw LinUpper", "float8": "titan_rw LinUpper float8",
        "torchtitan": "stock TorchTitan"}
print()
any_r = next(iter(res.values()), None)
if any_r:
    print(f"GPU check: llama {any_r['flavor']} on {any_r['world_size']} x {any_r['device']}, seq {any_r['seq_len']}, "
          f"local batch {any_r['local_batch_size']} (global {any_r['global_batch_size']}), compile={any_r['compile']}, "
          f"params {any_r['mixed_precision_param']}, median of {any_r['steps'] - any_r['warmup']} steps after {any_r['warmup']}")
print(f"| {'run':24s} | {'step ms':>9s} | {'tokens/s/GPU':>12s} | {'MFU %':>6s} | {'peak alloc GiB':>14s} | {'peak reserved GiB':>17s} | {'loss':>7s} |")
print(f"|{'-' * 26}|{'-' * 11}|{'-' * 14}|{'-' * 8}|{'-' * 16}|{'-' * 19}|{'-' * 9}|")
for s in names:
    r = res.get(s)
    if r is None:
        print(f"| {what[s]:24s} | {'FAILED':>9s} |")
        continue
    loss = r.get("last_metrics", {}).get("loss")
    print(f"| {what[s]:24s} | {r['step_s'] * 1e3:9.1f} | {f(r['tokens_per_s_per_device'], ',.0f'):>12s} | {f(r['mfu_pct'], '.1f'):>6s} "
          f"| {f(r['peak_alloc_gib'], '.2f'):>14s} | {f(r['peak_reserved_gib'], '.2f'):>17s} | {f(loss, '.4f'):>7s} |")


def ratio(a, b, goal=""):
    if a not in res or b not in res:
        return
    x, y = res[a], res[b]
    mem = (f"{x['peak_alloc_gib'] / y['peak_alloc_gib']:.3f}x" if x["peak_alloc_gib"] and y["peak_alloc_gib"] else "n/a")
    print(f"{what[a]} / {what[b]}: step time {x['step_s'] / y['step_s']:.3f}x{goal}, "
          f"tokens/s/GPU {x['tokens_per_s_per_device'] / y['tokens_per_s_per_device']:.3f}x, peak allocated {mem}")


ratio("linupper", "uniform", " (goal <= 1.01)")
ratio("uniform", "torchtitan", " (goal <= 1.02)")
ratio("float8", "linupper")
if "float8" in res:
    print(f"float8 run: {res['float8']['float8_linears']} Linear layers in float8 (the output projection stays in bf16)")
EOF
exit "$failed"

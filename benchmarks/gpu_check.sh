#!/usr/bin/env bash
# GPU check: the Llama 1.4B flavor, a few compiled bf16 steps with FSDP on every visible GPU,
# uniform then LinUpper, through the real trainer (benchmarks/gpu_step.py wraps its train_step
# with a timer). Prints tokens/s/GPU, MFU, peak memory and the LinUpper/uniform overhead.
#
#   benchmarks/gpu_check.sh [OUT_DIR] [--section.key value ...]
#
# Needs: the repo and its .venv already set up (torch with CUDA, torchtitan); no network, installs
# nothing. Data: the embedded corpus (train_configs/llama_1p4b.toml's default loader).
# Environment knobs (defaults): NPROC (nvidia-smi -L | wc -l), CONFIG (train_configs/llama_1p4b.toml),
# STEPS (12), WARMUP (4: steps not timed: compilation), SEQ (8192), LOCAL_BATCH (2),
# RUN_TIMEOUT (1200 s per run), PYTHON (python). Extra --section.key value arguments go to both
# runs after ours (they win), e.g. `--activation_checkpoint.mode full`.
# Exit status: 0 when both runs produced a result, 1 otherwise.
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
STEPS="${STEPS:-12}"
WARMUP="${WARMUP:-4}"
SEQ="${SEQ:-8192}"
LOCAL_BATCH="${LOCAL_BATCH:-2}"
RUN_TIMEOUT="${RUN_TIMEOUT:-1200}"
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

echo "gpu_check: $NPROC process(es), $CONFIG, $STEPS steps ($WARMUP untimed), seq $SEQ, local batch $LOCAL_BATCH -> $OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
fi
"$PYTHON" -c 'import torch, torchtitan; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchtitan", getattr(torchtitan, "__version__", "?"))' || true

failed=0
for strategy in uniform linupper; do
    port=$(( 29500 + RANDOM % 2000 ))
    echo "=== $strategy (timeout ${RUN_TIMEOUT}s, log $OUT/$strategy.log)"
    rm -f "$OUT/$strategy.json"
    set +e
    timeout --signal=TERM --kill-after=60 "$RUN_TIMEOUT" \
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" --master_port="$port" \
        benchmarks/gpu_step.py --config "$CONFIG" --warmup "$WARMUP" --out "$OUT/$strategy.json" \
        --job.dump_folder "$OUT/$strategy" \
        --training.steps "$STEPS" \
        --training.seq_len "$SEQ" \
        --training.local_batch_size "$LOCAL_BATCH" \
        --training.global_batch_size "$(( LOCAL_BATCH * NPROC ))" \
        --lr_scheduler.warmup_steps 2 \
        --reweight.strategy "$strategy" \
        --reweight.warmup_steps 0 \
        --reweight.log_interval 5 \
        --parallelism.data_parallel_shard_degree -1 \
        --compile.enable true \
        --training.mixed_precision_param bfloat16 \
        --checkpoint.enable false \
        --metrics.enable_tensorboard false \
        "$@" 2>&1 | tee "$OUT/$strategy.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc -ne 0 || ! -s "$OUT/$strategy.json" ]]; then
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            echo "gpu_check: $strategy timed out after ${RUN_TIMEOUT}s" >&2
        else
            echo "gpu_check: $strategy failed (exit $rc); see $OUT/$strategy.log" >&2
        fi
        failed=1
    fi
done

"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
res = {}
for s in ("uniform", "linupper"):
    p = os.path.join(out, f"{s}.json")
    if os.path.exists(p):
        with open(p) as fh:
            res[s] = json.load(fh)


def f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


print()
any_r = next(iter(res.values()), None)
if any_r:
    print(f"GPU check: llama {any_r['flavor']} on {any_r['world_size']} x {any_r['device']}, seq {any_r['seq_len']}, "
          f"local batch {any_r['local_batch_size']} (global {any_r['global_batch_size']}), compile={any_r['compile']}, "
          f"params {any_r['mixed_precision_param']}, median of {any_r['steps'] - any_r['warmup']} steps after {any_r['warmup']}")
print(f"| {'strategy':8s} | {'step ms':>9s} | {'tokens/s/GPU':>12s} | {'MFU %':>6s} | {'peak alloc GiB':>14s} | {'peak reserved GiB':>17s} | {'loss':>7s} |")
print(f"|{'-' * 10}|{'-' * 11}|{'-' * 14}|{'-' * 8}|{'-' * 16}|{'-' * 19}|{'-' * 9}|")
for s in ("uniform", "linupper"):
    r = res.get(s)
    if r is None:
        print(f"| {s:8s} | {'FAILED':>9s} |")
        continue
    loss = r.get("last_metrics", {}).get("loss")
    print(f"| {s:8s} | {r['step_s'] * 1e3:9.1f} | {f(r['tokens_per_s_per_device'], ',.0f'):>12s} | {f(r['mfu_pct'], '.1f'):>6s} "
          f"| {f(r['peak_alloc_gib'], '.2f'):>14s} | {f(r['peak_reserved_gib'], '.2f'):>17s} | {f(loss, '.4f'):>7s} |")
if len(res) == 2:
    u, l = res["uniform"], res["linupper"]
    mem = (f"{l['peak_alloc_gib'] / u['peak_alloc_gib']:.3f}x" if l["peak_alloc_gib"] and u["peak_alloc_gib"] else "n/a")
    print(f"overhead LinUpper / uniform: step time {l['step_s'] / u['step_s']:.3f}x (goal <= 1.01), "
          f"tokens/s/GPU {l['tokens_per_s_per_device'] / u['tokens_per_s_per_device']:.3f}x, peak allocated {mem}")
EOF
exit "$failed"

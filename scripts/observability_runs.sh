#!/usr/bin/env bash
# The three runs whose metrics.jsonl, samples.jsonl and TensorBoard scalars must not change when
# the observability code is restructured (issue 25); compare two output folders with
# scripts/compare_runs.py:
#
#   bash scripts/observability_runs.sh OUT_BEFORE      # on the old code
#   bash scripts/observability_runs.sh OUT_AFTER       # on the new code
#   .venv/bin/python scripts/compare_runs.py OUT_BEFORE OUT_AFTER
#
# one   1 rank, 30 steps, scope microbatch (k = 2 groups of 8), a non-finite loss injected at step 7
#       (a skipped step), a checkpoint at step 15 (the pre-checkpoint flush), logs every 4 steps
# two   2 ranks (torchrun, gloo on CPU), 10 steps, scope microbatch (2 groups of 2 x 4)
# docs  1 rank, 12 steps, reweight.granularity = "document" on the shipped fortunes (cap 2)
# Every run logs histograms and samples tables often so that those paths run too.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: observability_runs.sh OUT_FOLDER}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
COMMON=(--config train_configs/debug_cpu.toml --training.seq_len 64 --logging.histogram_interval 5
        --logging.samples_interval 5 --logging.top_k 3)
which=${2:-one two docs}
for run in $which; do
  rm -rf "$OUT/$run"
  case $run in
    one)
      "$PY" -m titan_rw.train "${COMMON[@]}" --job.dump_folder "$OUT/one" --training.steps 30 \
        --reweight.scope microbatch --logging.log_interval 4 --fault_injection.nan_loss_steps '[7]' \
        --checkpoint.interval 15 --checkpoint.keep_latest_k 2 > "$OUT/one.log" 2>&1 ;;
    two)
      "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m titan_rw.train "${COMMON[@]}" \
        --job.dump_folder "$OUT/two" --training.steps 10 --training.local_batch_size 4 \
        --reweight.scope microbatch --logging.log_interval 3 --checkpoint.enable false > "$OUT/two.log" 2>&1 ;;
    docs)
      "$PY" -m titan_rw.train "${COMMON[@]}" --job.dump_folder "$OUT/docs" --training.steps 12 \
        --training.seq_len 128 --data.dataset_path titan_rw/assets/corpus/train/fortunes.parquet \
        --reweight.granularity document --reweight.max_documents_per_row 4 --reweight.min_document_tokens 8 \
        --reweight.cap 2.0 --reweight.temperature 0.2 --reweight.warmup_steps 1 --logging.log_interval 3 \
        --checkpoint.enable false > "$OUT/docs.log" 2>&1 ;;
    *) echo "unknown run $run (one, two, docs)" >&2; exit 2 ;;
  esac
  echo "$run: $(ls "$OUT/$run")"
done

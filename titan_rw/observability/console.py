"""The console (rank 0): at each flush a warning per skipped step, one for the interval's overflow
rows (document granularity), and the progress line of the interval's last row; the eval scores."""

from __future__ import annotations

import logging

from titan_rw.progress import Progress

log = logging.getLogger()  # TorchTitan's logger (the root logger): the console lines of the run


def eval_scores(step: int, scores: dict[str, float]) -> None:
    """The periodic evaluation's scores of an eval step, one line."""
    log.info(f"step {step} eval: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))


def report(rows: list[dict], progress: Progress) -> None:
    for r in rows:
        if r.get("skipped", 0) > 0:
            why = (f"{int(r['nonfinite_samples'])} sample(s) with a non-finite loss"
                   if r.get("nonfinite_samples", 0) > 0 else f"non-finite gradient norm ({r.get('grad_norm')})")
            log.warning(
                f"step {r['step']}: {why}; optimizer step skipped "
                f"({int(r.get('consecutive_skips', 0))} in a row, {int(r.get('skipped_steps', 0))} in the run)"
            )
    over = sum(int(r.get("overflow_rows", 0)) for r in rows)
    if over:
        log.warning(f"steps {rows[0]['step']}-{rows[-1]['step']}: {over} row(s) held more documents than "
                     f"reweight.max_documents_per_row; each row's tail fragments were merged into its last slot "
                     f"and kept at their token share (overflow_rows in metrics.jsonl)")
    if rows:
        log.info(progress.row_line(rows[-1]))

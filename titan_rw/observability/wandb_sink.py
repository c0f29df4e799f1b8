"""The Weights & Biases sink: the same charted scalars as TensorBoard (same tags, `names.tag_of`),
the weight histogram in the same buckets up to the bound 2/b (`rows.weight_buckets`), the loss
histogram, and the samples tables as a W&B table.

W&B is switched on by TorchTitan's `[metrics] enable_wandb = true` and configured by W&B's own
environment variables (WANDB_PROJECT, WANDB_MODE=offline, WANDB_DIR, WANDB_API_KEY, ...: TorchTitan's
`WandBLogger` calls `wandb.init` with them); this sink logs into that run (`wandb_run_of`), on rank 0.
"""

from __future__ import annotations

from typing import Any

from titan_rw.observability.names import HIST_TAGS, charted_scalars
from titan_rw.observability.rows import Interval, weight_buckets

SAMPLE_COLUMNS = ("step", "table", "rank", "weight_x_b", "weight", "loss", "domain", "doc_id", "url", "text")
SAMPLES_KEY = "data/weighted_samples"


def require_wandb(enabled: bool) -> None:
    """`metrics.enable_wandb = true` without the wandb package: ModuleNotFoundError with one line,
    before anything is built (TorchTitan alone would log an error and train without W&B)."""
    if not enabled:
        return
    try:
        import wandb  # noqa: F401  (only whether it imports)
    except ImportError:
        raise ModuleNotFoundError(
            "metrics.enable_wandb = true needs the wandb package, which is not installed: "
            "pip install 'titan_rw[wandb]' (in a checkout: pip install -e '.[wandb]'), "
            "or set metrics.enable_wandb = false") from None


def wandb_run_of(metrics_processor) -> Any | None:
    """The W&B run TorchTitan's MetricsProcessor logs to (its WandBLogger, rank 0 only); None when
    `metrics.enable_wandb` is off or this rank does not log."""
    lg = getattr(metrics_processor, "logger", None)
    for sub in getattr(lg, "_loggers", [lg]):
        wandb = getattr(sub, "wandb", None)
        if wandb is not None and getattr(wandb, "run", None) is not None:
            return wandb.run
    return None


def samples_rows(s: dict) -> list[list]:
    """A samples table's entries as rows of SAMPLE_COLUMNS (rank 1 = the most weighted)."""
    return [[s["step"], which, n, x["weight_x_b"], x["weight"], x["loss"], x["domain"], x["doc_id"], x["url"], x["text"]]
            for which in ("top", "bottom") for n, x in enumerate(s[which], 1)]


class WandbSink:
    """One `run.log(..., step=step)` per row: its scalars, and on histogram / samples steps the
    weight and loss histograms and the samples table."""

    def __init__(self, run: Any):
        import wandb

        self.wandb = wandb
        self.run = run

    def write(self, iv: Interval) -> None:
        hists = {h.step: h for h in iv.histograms}
        samples = {s["step"]: s for s in iv.samples}
        for row in iv.rows:
            step = row["step"]
            data: dict[str, Any] = dict(charted_scalars(row))
            if step in hists:
                h = hists[step]
                counts, edges = weight_buckets(h.weights, h.bound)
                data[HIST_TAGS["weights"]] = self.wandb.Histogram(np_histogram=(counts, edges))
                data[HIST_TAGS["losses"]] = self.wandb.Histogram(h.losses)
            if step in samples:
                data[SAMPLES_KEY] = self.wandb.Table(columns=list(SAMPLE_COLUMNS), data=samples_rows(samples[step]))
            self.run.log(data, step=step)

    def write_samples(self, iv: Interval) -> None:
        """The tables went with their rows (`write`)."""

    def close(self) -> None:
        """The run is TorchTitan's: its MetricsProcessor finishes it."""

    def abandon(self) -> None:
        pass


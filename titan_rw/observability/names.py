"""The names: each quantity has ONE metric name, from the device metric to metrics.jsonl's key; a
sink that groups its charts (TensorBoard, W&B) shows it under `tag_of(name)`."""

from __future__ import annotations

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

# metric name -> chart tag (TensorBoard and W&B)
SCALAR_TAGS = {
    "loss": "loss/unweighted",
    "weighted_loss": "loss/weighted",
    "max_weight": "weights/max",
    "ess": "weights/ess",
    "weight_entropy": "weights/entropy",
    "temperature": "weights/temperature",
    "max_weight_bound": "bound/two_over_b",
    "bound_ratio": "bound/ratio",
    "bound_violations": "bound/violations",
    "bound_violations_total": "bound/violations_total",
    "max_weight_ratio": "bound/max_weight_ratio",  # granularity = "document": max w_d/π_d, bound 2
    "overflow_rows": "health/overflow_rows",  # document granularity: rows with more fragments than slots
    "tokens_per_sec": "perf/tokens_per_sec",
    "mfu": "perf/mfu",
}
HIST_TAGS = {"weights": "weights/weight_hist", "losses": "weights/loss_hist"}
WINDOW_TAGS = {"max_weight": "weights/max_window", "bound_ratio": "bound/ratio_window"}
TEXT_TAGS = {"top": "data/top_weighted", "bottom": "data/bottom_weighted"}
DOMAIN_KEYS = ("mean_weight", "share", "weight_mass")  # data/<key>/<domain>

# the trainer's fault counters (docs/resuming.md): chart group health/
HEALTH_KEYS = ("skipped", "skipped_steps", "consecutive_skips", "nonfinite_samples")
# row fields that are no chart: identity and layout, not a value over steps
NOT_CHARTED = ("step", "b", "groups", "domains")


def tag_of(name: str) -> str:
    """The chart tag of a metric: its SCALAR_TAGS entry; a fault counter under health/; a name
    with a group of its own (eval/<task>/<metric>) as it is; any other (lr, grad_norm) under perf/."""
    if name in SCALAR_TAGS:
        return SCALAR_TAGS[name]
    if name in HEALTH_KEYS:
        return f"health/{name}"
    return name if "/" in name else f"perf/{name}"


def charted_scalars(row: dict):
    """(tag, value) of every number of a metrics row that is charted, in the row's order: None
    (max_weight_bound at document granularity: a bound per fragment), strings, bools and the
    fields of NOT_CHARTED are not."""
    for k, x in row.items():
        if x is None or k in NOT_CHARTED or isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        yield tag_of(k), float(x)
    for dom, d in (row.get("domains") or {}).items():
        for key in DOMAIN_KEYS:
            yield f"data/{key}/{dom}", d[key]


def tensorboard_layout() -> dict:
    """TensorBoard's Custom Scalars page of a run (written once with the run's first events):
    the losses first, then the max weight and the 2/b bound in ONE chart (Theorem 1: the line of
    weights/max stays under bound/two_over_b), then every domain's mean b·w overlaid in one chart
    (1 = uniform), the health counters and the speed. Tags are regular expressions."""
    return {
        "losses": {
            "loss: unweighted mean and weighted sum": ["Multiline", ["^loss/unweighted$", "^loss/weighted$"]],
        },
        "weights vs the 2/b bound": {
            "max weight and 2/b (Theorem 1)": ["Multiline", ["^weights/max$", "^bound/two_over_b$"]],
            "max·b/2 (≤ 1: the bound holds)": ["Multiline", ["^bound/ratio$"]],
            "effective sample size": ["Multiline", ["^weights/ess$"]],
            "temperature r": ["Multiline", ["^weights/temperature$"]],
        },
        "data domains": {
            "mean b·w per domain (1 = uniform)": ["Multiline", ["^data/mean_weight/"]],
            "share of the rows per domain": ["Multiline", ["^data/share/"]],
            "share of the weight per domain": ["Multiline", ["^data/weight_mass/"]],
        },
        "health": {
            "skipped steps and non-finite samples": ["Multiline", ["^health/", "^bound/violations_total$"]],
        },
        "performance": {
            "tokens/s per device": ["Multiline", ["^perf/tokens_per_sec$"]],
            "learning rate": ["Multiline", ["^perf/lr$"]],
            "gradient norm": ["Multiline", ["^perf/grad_norm$"]],
        },
    }

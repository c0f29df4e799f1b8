"""On the host: the interval's named rows, built from its one host copy. A row is what
metrics.jsonl holds for a step, in this order: the step's device metrics (`device.step_metrics`,
with b and bound_violations as integers), bound_violations_total and max_weight_bound (the host's
running count and c/b), the trainer's device values (the fault counters, grad_norm), its host
values (groups, granularity, temperature, lr, phase, eval scores), tokens_per_sec (and mfu), the
run's constant fields, and the per-domain statistics. Every sink receives these rows (`Interval`).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from titan_rw.observability.device import HostBuffer, Slot
from titan_rw.observability.provenance import SampleTables, domain_stats, domain_stats_documents

# the step metrics that open every row, before the host's two bound fields
_HEAD = ("loss", "weighted_loss", "max_weight", "b", "bound_ratio", "bound_violations", "ess", "weight_entropy")


@dataclass
class PendingStep:
    """A recorded step waiting for the interval's transfer: named device scalars, host values,
    the slots of its per-sample vectors, and its provenance (host lists)."""

    step: int
    names: tuple[str, ...]
    slot: Slot
    host: dict[str, Any]
    documents: bool
    vectors: dict[str, Slot] = field(default_factory=dict)  # weights, valid, group_b, scale, losses, inputs
    histogram: bool = False
    prov: list | None = None
    prov_index: list[int] | None = None
    samples: bool = False


@dataclass
class StepHistogram:
    """A histogram step: the valid samples' weights as charted (b·w's w; documents: w_d/π_d), the
    bound the weights' axis must reach (2/b; documents: c), and their losses."""

    step: int
    weights: np.ndarray
    bound: float
    losses: np.ndarray


@dataclass
class Interval:
    """What every sink receives at a flush: the rows, the histogram steps, the samples tables, and
    the windowed (max_weight, bound_ratio) of the last steps (finite rows only; None if empty)."""

    rows: list[dict]
    histograms: list[StepHistogram]
    samples: list[dict]
    window: np.ndarray | None


def weight_buckets(weights: np.ndarray, bound: float, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the weights in `bins` equal buckets over [min(0, min w), max(bound, max w)],
    empty ones included, so a chart's axis always reaches the bound."""
    w = weights.astype(np.float64)
    top = max(float(w.max()), bound if math.isfinite(bound) else 0.0)
    lo = min(0.0, float(w.min()))
    if not top > lo:
        top = lo + 1.0
    return np.histogram(w, bins=np.linspace(lo, top, bins + 1))


class IntervalRows:
    """Builds an interval's rows from its host copy; keeps what runs across intervals: the total
    of bound violations and the window of max weights (both checkpointed), the token count for
    tokens/s."""

    def __init__(self, *, bound_c: float, window: int, tables: SampleTables, static: Mapping[str, Any],
                 num_flops_per_token: float | None = None, peak_flops: float | None = None):
        self.bound_c = bound_c
        self.tables = tables
        self.static = dict(static)
        self.num_flops_per_token = num_flops_per_token
        self.peak_flops = peak_flops
        self.violations_total = 0
        self.window: collections.deque = collections.deque(maxlen=window)
        self.ntokens = 0
        self.t_last = time.perf_counter()

    def tokens_per_sec(self) -> float | None:
        """Tokens per second since the last flush (None if no tokens were counted); restarts the count."""
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        tps = self.ntokens / dt if self.ntokens else None
        self.t_last, self.ntokens = now, 0
        return tps

    def build(self, pending: list[PendingStep], host: HostBuffer) -> Interval:
        tps = self.tokens_per_sec()
        out = Interval([], [], [], None)
        for e in pending:
            row = self._row(e, host, tps)
            vec = {k: host.get(s) for k, s in e.vectors.items()}
            if "valid" in vec:
                vec["valid"] = vec["valid"] > 0.5
            if "group_b" in vec:
                vec.setdefault("scale", vec["group_b"])  # w·scale = 1: uniform weight
            if e.prov is not None:
                idx = np.asarray(list(e.prov_index if e.prov_index is not None else range(len(e.prov))), dtype=np.int64)
                stats = domain_stats_documents if e.documents else domain_stats
                row["domains"] = stats(e.prov, idx, vec["weights"], vec["valid"], vec["scale"])
                if e.samples:
                    out.samples.append(self.tables.table(e.step, e.prov, idx, vec["weights"], vec["valid"],
                                                         vec.get("losses"), vec.get("inputs"), vec["group_b"],
                                                         vec["scale"]))
            self.window.append((row["max_weight"], row["bound_ratio"]))
            out.rows.append(row)
            if e.histogram and "weights" in vec and vec["valid"].any():
                out.histograms.append(self._histogram(e, row, vec))
        win = np.asarray(self.window, dtype=np.float64) if self.window else np.zeros((0, 2))
        win = win[np.isfinite(win).all(axis=1)] if len(win) else win
        out.window = win if len(win) else None
        return out

    def _row(self, e: PendingStep, host: HostBuffer, tps: float | None) -> dict[str, Any]:
        v = host.named(e.names, e.slot)
        row: dict[str, Any] = {"step": e.step}
        row.update((k, v.pop(k)) for k in _HEAD)
        row["b"] = int(round(row["b"]))
        row["bound_violations"] = int(round(row["bound_violations"]))
        self.violations_total += row["bound_violations"]
        row["bound_violations_total"] = self.violations_total
        # documents: no single c/b, the bound is per fragment (w_d <= c π_d, max_weight_ratio)
        row["max_weight_bound"] = None if e.documents else self.bound_c / row["b"] if row["b"] else float("nan")
        row.update(v)  # max_weight_ratio, overflow_rows, the trainer's device values
        row.update(e.host)
        if tps is not None:
            row.setdefault("tokens_per_sec", tps)
            if self.num_flops_per_token and self.peak_flops:
                row.setdefault("mfu", 100.0 * self.num_flops_per_token * tps / self.peak_flops)
        row.update({k: x for k, x in self.static.items() if k not in row})
        return row

    def _histogram(self, e: PendingStep, row: dict, vec: dict) -> StepHistogram:
        ok = vec["valid"]
        losses = vec["losses"][ok].astype(np.float64)
        if e.documents:  # w_d / π_d (1 = uniform), axis to the bound c
            return StepHistogram(e.step, vec["weights"][ok] * vec["scale"][ok], self.bound_c, losses)
        return StepHistogram(e.step, vec["weights"][ok], row["max_weight_bound"], losses)

    def state_dict(self) -> dict[str, Any]:
        return {"violations_total": self.violations_total, "window": list(self.window)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.violations_total = int(sd.get("violations_total", 0))
        self.window.clear()
        self.window.extend(tuple(x) for x in sd.get("window", []))

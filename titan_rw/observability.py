"""Observability of the reweighted run: metrics.jsonl and TensorBoard, in one place.

`RunLogger` is what the trainer calls:

    rl = RunLogger.Config(log_interval=10).build(dump_folder, rank)   # or .build(..., writer=...)
    rl.record(step, stats, temperature=r, provenance=rows, ntokens=n, extra={"lr": lr, "grad_norm": g})
    if rl.should_flush(step): rows = rl.flush(step)                   # list of the rows just written
    rl.close()

`record` never reads a device tensor on the host: it reduces the step's `WeightStats` to one small
device vector with tensor ops and keeps references to the per-sample vectors it will need (weights
and losses on histogram / sample steps, or when provenance is given). `flush` concatenates every
pending device tensor into one flat float32 tensor and moves it to the host in ONE transfer, then
writes, per recorded step:

- one JSON object to `<dump_folder>/metrics.jsonl` (names below; `read_metrics` reads them back),
- TensorBoard scalars / histograms / text, tags grouped as in docs/design.md §5:

  loss/unweighted, loss/weighted                         mean f_i, Σ w_i f_i
  weights/max, weights/ess (1/Σw²), weights/entropy (nats), weights/temperature
  weights/weight_hist, weights/loss_hist                 histograms over the b valid samples (the
                                                         weights' axis runs from 0 to at least 2/b)
  weights/max_window                                     max weight of each of the last N steps
  bound/two_over_b, bound/ratio (max·b/2, ≤ 1 holds), bound/violations, bound/violations_total
  bound/ratio_window                                     max·b/2 of each of the last N steps
  data/mean_weight/<domain>   mean b·w of the domain's rows (1 = uniform weight)
  data/share/<domain>         the domain's share of the rows (token-weighted)
  data/weight_mass/<domain>   the domain's share of the total weight (of Σ b·w)

b is always a reweighting group's own b (its valid samples). A step has k groups under gradient
accumulation in `microbatch` scope, each with weights summing to 1: every sample's b·w uses its own
group's b, the bound is checked per group against that group's c/b (bound/ratio is the largest
max_g·b_g/c, bound/violations counts the groups above 1), and weights/max with bound/two_over_b
(row keys max_weight, max_weight_bound, b) are the step's largest weight and its group's bound.
  data/top_weighted, data/bottom_weighted   text plugin: k most / least weighted samples
  perf/tokens_per_sec (per device), perf/mfu (%, GPU only), perf/<extra key> (lr, grad_norm, ...)
  health/skipped, health/skipped_steps, health/consecutive_skips, health/nonfinite_samples

and a Custom Scalars layout (`tensorboard_layout`): the losses, weights/max with bound/two_over_b
in one chart, the domains' weights overlaid, health, performance.

The k most / least weighted samples also go to `<dump_folder>/samples.jsonl`.

Both files survive tears (docs/resuming.md "Torn lines, full disk"): before the first append, a
torn last line (the half row a kill or a full disk leaves) is cut away, one log line for both files
(`cut_torn_tail`); `read_metrics` / `read_samples` ignore a torn last line. A write that fails
(no space left, quota, read-only) sets `RunLogger.failure` to one line and stops every later write;
the trainer stops the run on it before any further checkpoint (titan_rw.faults.StopGuard).

Only rank 0 (or the `rank` given as the writer) writes; on other ranks every call is a no-op.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from titan_rw.progress import Progress

_log = logging.getLogger()  # TorchTitan's logger (the root logger): the console lines of the run

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

# Per-step device vector, in this order (then the temperature if it is a tensor, then tensor extras).
_ROW = ("loss", "weighted_loss", "max_weight", "b", "bound_ratio", "bound_violations", "ess", "weight_entropy")

# metrics.jsonl key -> TensorBoard tag
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


# the trainer's fault counters (docs/resuming.md): TensorBoard group health/
HEALTH_KEYS = ("skipped", "skipped_steps", "consecutive_skips", "nonfinite_samples")


def _extra_tag(key: str) -> str:
    if key in HEALTH_KEYS:
        return f"health/{key}"
    return key if "/" in key else f"perf/{key}"


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


def _weight_histogram(writer, tag: str, weights: np.ndarray, bound: float, step: int, bins: int = 40) -> None:
    """The weights' histogram over [0, max(2/b, max w)] in equal buckets, empty ones included, so the
    Histograms tab's axis always reaches the bound. Written in TensorBoard's histogram format of
    explicit (left, right, count) buckets: the older format (`add_histogram`) loses the empty
    buckets and would stretch the last filled one to the axis end."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.histogram import metadata as hist_metadata
    from tensorboard.util import tensor_util

    w = weights.astype(np.float64)
    top = max(float(w.max()), bound if math.isfinite(bound) else 0.0)
    lo = min(0.0, float(w.min()))
    if not top > lo:
        top = lo + 1.0
    counts, edges = np.histogram(w, bins=np.linspace(lo, top, bins + 1))
    buckets = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    value = Summary.Value(tag=tag, metadata=hist_metadata.create_summary_metadata(display_name=tag, description=""),
                          tensor=tensor_util.make_tensor_proto(buckets))
    writer._get_file_writer().add_summary(Summary(value=[value]), step)


def tb_writer_of(metrics_processor) -> Any | None:
    """The SummaryWriter inside a TorchTitan MetricsProcessor (None when TensorBoard is off there).

    Passing it to `build(writer=...)` puts our tags in TorchTitan's own event directory, so
    TensorBoard shows one run with both sets of tags."""
    lg = getattr(metrics_processor, "logger", None)
    for sub in getattr(lg, "_loggers", [lg]):
        w = getattr(sub, "writer", None)
        if w is not None:
            return w
    return None


@dataclass(frozen=True)
class GroupLayout:
    """Where this rank's samples sit in a step's reweighting groups: micro-batch j's group holds
    dp_size · local_samples samples, in DP-rank order, and the step's groups are concatenated."""

    microbatches: int = 1
    local_samples: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    fragments_per_row: int = 1
    """granularity = "document": a row's samples are its max_documents_per_row fragment slots, and
    local_samples counts slots (rows × slots)."""

    def per_sample(self, provenance: list) -> list:
        """Rows' provenance → one entry per sample: a row's documents go to its fragment slots in
        order (the tail of an overflow row to the last slot, as a list); empty slots get None."""
        F = self.fragments_per_row
        if F == 1:
            return provenance
        out = []
        for docs in provenance:
            docs = [d for d in (docs or []) if d]
            out.extend(docs[j] if j < len(docs) else None for j in range(F - 1))
            out.append(docs[F - 1] if len(docs) == F else (docs[F - 1:] or None))
        return out

    def provenance_index(self, n_rows: int) -> list[int] | None:
        """Position of each of this rank's rows in the step's groups concatenated: micro-batch j,
        row r -> j·b + dp_rank·b_local + r, b = dp_size·b_local (both scopes). None: the identity."""
        k, b_l = self.microbatches, self.local_samples
        if k == 1 and self.dp_rank == 0:
            return None
        b = b_l * self.dp_size
        return [j * b + self.dp_rank * b_l + r for j in range(k) for r in range(b_l)][:n_rows]


@dataclass
class FaultCounters:
    """The step's fault counters (device int64 scalars), merged into its metrics row."""

    nonfinite_samples: torch.Tensor  # NaN/inf losses in the step: weight 0, step dropped
    skipped: torch.Tensor  # 1 when this step's optimizer update was skipped
    skipped_steps: torch.Tensor  # since the start of the run (checkpointed)
    consecutive_skips: torch.Tensor

    def as_metrics(self) -> dict[str, torch.Tensor]:
        return {"nonfinite_samples": self.nonfinite_samples, "skipped": self.skipped,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}


@dataclass
class StepRecord:
    """One optimizer step, as the trainer hands it to `RunLogger.record_step` (device tensors stay
    on device until the interval's flush)."""

    step: int
    groups: list  # titan_rw.loss.WeightStats, one per reweighting group
    temperature: float | torch.Tensor | None  # None: a uniform burn-in step (no r applies)
    lr: float
    grad_norm: torch.Tensor
    ntokens: int
    faults: FaultCounters | None = None
    scores: dict[str, float] = field(default_factory=dict)  # periodic eval, on eval steps
    provenance: list | None = None  # this rank's rows (loader's last_provenance), rank 0 only
    inputs: torch.Tensor | None = None  # their tokens, on samples steps
    phase: str | None = None  # TemperatureSchedule.phase: burn-in, warm-up, anneal or target


class RunLogger:
    @dataclass(kw_only=True, slots=True)
    class Config:
        """`[logging]`: what the run writes and how often (the TensorBoard switch and folder are
        TorchTitan's `metrics.enable_tensorboard` / `metrics.save_tb_folder`)."""

        metrics_file: str = METRICS_FILE
        """File under dump_folder that receives one JSON object per step (rank 0)."""
        samples_file: str = SAMPLES_FILE
        log_interval: int = 10
        """Steps between host reads of the on-device statistics (metrics.jsonl, TensorBoard, console);
        steps 1 and the last step flush too."""
        histogram_interval: int = 50
        """TensorBoard histograms of the weights and per-sample losses every N steps (and step 1)."""
        samples_interval: int = 100
        """The top_k most / least weighted samples (text, doc id, URL) to TensorBoard and samples.jsonl
        every N steps (and step 1)."""
        top_k: int = 3
        """Samples per table (0: none)."""
        snippet_chars: int = 240
        max_weight_window: int = 1000
        """Steps in the windowed distribution of the per-step max weight (weights/max_window)."""
        bound_c: float = 2.0
        """Theorem 1's bound is max w <= bound_c / b."""
        bound_tol: float = 1e-6
        """Relative slack before max·b/c > 1 counts as a violation (float rounding of a capped max)."""
        lookup_parquet: list[str] = field(default_factory=list)
        """Extra parquet files/dirs with id/url/text columns to resolve sample doc ids to URL and text
        (a provenance shard that is itself a parquet file is looked up without this)."""
        lookup_max_mb: float = 512.0
        """Skip text lookup in parquet files larger than this (rank 0 would stall)."""

        def validate(self) -> None:
            for name in ("log_interval", "histogram_interval", "samples_interval", "max_weight_window"):
                if getattr(self, name) < 1:
                    raise ValueError(f"logging.{name} must be >= 1, got {getattr(self, name)}")
            if self.top_k < 0:
                raise ValueError(f"logging.top_k must be >= 0, got {self.top_k}")
            if not self.bound_c > 0:
                raise ValueError(f"logging.bound_c must be > 0, got {self.bound_c}")

        def build(self, dump_folder: str, rank: int = 0, **kwargs) -> "RunLogger":
            return RunLogger(self, dump_folder=dump_folder, rank=rank, **kwargs)

    def __init__(
        self,
        config: "RunLogger.Config",
        *,
        dump_folder: str,
        rank: int = 0,
        writer_rank: int = 0,
        writer: Any | None = None,
        tb_dir: str | None = None,
        tensorboard: bool = True,
        layout: "GroupLayout | None" = None,
        num_flops_per_token: float | None = None,
        peak_flops: float | None = None,
        decode=None,
        static: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
    ):
        """`writer`: an existing SummaryWriter (e.g. `tb_writer_of(trainer.metrics_processor)`).
        `num_flops_per_token`, `peak_flops`: MFU = 100 · flops/token · tokens/s per device / peak.
        `decode(list[int]) -> str`: renders the sample snippets from the `inputs` given to record.
        `static`: constant fields copied into every metrics.jsonl row (e.g. {"strategy": "linupper"}).
        `total_steps`: the last step always flushes.
        `tensorboard`: write event files (own writer under <dump_folder>/tb/<time> unless `writer`).
        `layout`: where this rank's samples sit in a step's groups (`record_step`'s provenance)."""
        config.validate()
        self.config = config
        self.dump_folder = dump_folder
        self.enabled = rank == writer_rank
        self.num_flops_per_token = num_flops_per_token
        self.peak_flops = peak_flops
        self.decode = decode
        self.static = dict(static or {})
        self.total_steps = total_steps
        self.layout = layout or GroupLayout()
        self.progress = Progress(total_steps or 0)
        self.metrics_path = os.path.join(dump_folder, config.metrics_file)
        self.samples_path = os.path.join(dump_folder, config.samples_file)
        self._pending: list[dict] = []  # one per recorded step
        self._dev: list[torch.Tensor] = []  # flat float32 device pieces of the pending steps
        self._dev_len = 0
        self._ntokens = 0
        self._t_last = time.perf_counter()
        self.violations_total = 0
        self._window: collections.deque = collections.deque(maxlen=config.max_weight_window)
        self._lookup = _DocLookup(config.lookup_parquet, config.lookup_max_mb)
        self._fh = None
        self._samples_fh = None
        self.writer = None
        self._own_writer = False
        self.tb_dir = None
        self.failure: str | None = None  # one line once a write failed; nothing is written after it
        if not self.enabled:
            return
        os.makedirs(dump_folder, exist_ok=True)
        _quiet_tensorboard_thread_errors()
        cut = {p: cut_torn_tail(p) for p in (self.metrics_path, self.samples_path)}
        if any(cut.values()):
            _log.warning("titan_rw logging: cut a torn last line (a run killed mid-write) before appending: "
                         + ", ".join(f"{os.path.basename(p)} {n} bytes" for p, n in cut.items() if n))
        if tensorboard:
            if writer is not None:
                self.writer = writer
                self.tb_dir = getattr(writer, "log_dir", None) or writer.get_logdir()
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.tb_dir = tb_dir or os.path.join(
                    dump_folder, "tb", datetime.now().strftime("%Y%m%d-%H%M")
                )
                self.writer = SummaryWriter(self.tb_dir, max_queue=1000)
                self._own_writer = True
            self.writer.add_custom_scalars(tensorboard_layout())

    # ------------------------------------------------------------------ per step (device only)
    def _put(self, t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
        """Queue a device tensor for the interval's single transfer; returns its (offset, shape)."""
        t = t.detach()
        off = self._dev_len
        self._dev.append(t.reshape(-1).to(torch.float32))
        self._dev_len += t.numel()
        return off, tuple(t.shape)

    @staticmethod
    def _is_every(step: int, n: int) -> bool:
        return step == 1 or step % n == 0

    def record(
        self,
        step: int,
        stats,
        *,
        temperature: float | torch.Tensor,
        provenance: Sequence[Any] | None = None,
        provenance_index: Sequence[int] | None = None,
        inputs: torch.Tensor | None = None,
        ntokens: int | None = None,
        extra: Mapping[str, float | int | torch.Tensor] | None = None,
    ) -> None:
        """Store one optimizer step. No host synchronisation: only device ops and references.

        stats: a `titan_rw.loss.WeightStats`, or a sequence of them (one per micro-batch group).
        provenance: host-side per-sample info (the loader's `last_provenance`: per row a list of
            document dicts with domain, doc_id, n_tokens, ...; a single dict per row also works).
        provenance_index: the position of each provenance row in the step's samples (the groups'
            samples concatenated in order). Default 0..len-1: rank 0's rows of a single group.
        inputs: optional token ids [rows, L] aligned with provenance; with `decode`, the sample
            snippets show exactly the text the model saw (kept only on sample steps).
        ntokens: tokens this device processed in the step (for tokens/s and MFU).
        extra: more scalars (lr, grad_norm, mfu, ...); tensors stay on device until flush.
        """
        if not self.enabled:
            return
        groups = list(stats) if isinstance(stats, (list, tuple)) else [stats]
        if not groups:
            raise ValueError("RunLogger.record: no WeightStats given")
        c = self.config.bound_c
        with torch.no_grad():
            w = [g.weights.detach().float() for g in groups]
            max_w = torch.stack([g.max_weight.detach().float().reshape(()) for g in groups])
            b = torch.stack([g.b.detach().float().reshape(()) for g in groups])
            docs = groups[0].prior is not None  # granularity = "document": bound w_d <= c pi_d
            if docs:
                ratio = torch.stack([g.max_ratio.detach().float().reshape(()) for g in groups]) / c
            else:
                ratio = max_w * b / c  # each group against its own bound c / b_g
            ess = torch.stack([1.0 / (x * x).sum().clamp(min=1e-30) for x in w])
            ent = torch.stack([-torch.where(x > 0, x * x.clamp(min=1e-30).log(), 0.0).sum() for x in w])
            top = max_w.argmax().reshape(1)  # the group holding the step's max weight
            parts = [
                torch.stack([g.mean_loss.detach().float().reshape(()) for g in groups]).mean(),
                torch.stack([g.weighted_loss.detach().float().reshape(()) for g in groups]).mean(),
                max_w.max(),
                b.gather(0, top).reshape(()),  # its b: max_weight is judged against c / (this b)
                ratio.max(),
                (ratio > 1.0 + self.config.bound_tol).float().sum(),
                ess.mean(),
                ent.mean(),
            ]
            host: dict[str, Any] = {"groups": len(groups)}
            dev_keys: list[str] = []
            if docs:
                parts += [ratio.max() * c, torch.stack([g.overflow_rows.float().reshape(()) for g in groups]).sum()]
                dev_keys += ["max_weight_ratio", "overflow_rows"]
                host["granularity"] = "document"
            if isinstance(temperature, torch.Tensor):
                parts.append(temperature.detach().float().reshape(()))
                dev_keys.append("temperature")
            else:  # None in a uniform burn-in: null in metrics.jsonl, no TensorBoard point
                host["temperature"] = None if temperature is None else float(temperature)
            for k, v in (extra or {}).items():
                if isinstance(v, torch.Tensor):
                    parts.append(v.detach().float().reshape(()))
                    dev_keys.append(k)
                else:
                    host[k] = v
            entry: dict[str, Any] = {
                "step": int(step),
                "row": self._put(torch.stack(parts)),
                "dev_keys": dev_keys,
                "host": host,
            }
            want_hist = self._is_every(step, self.config.histogram_interval)
            want_samples = provenance is not None and self.config.top_k > 0 and self._is_every(
                step, self.config.samples_interval
            )
            if want_hist or provenance is not None:
                entry["weights"] = self._put(torch.cat(w))
                entry["valid"] = self._put(torch.cat([g.valid.detach().reshape(-1) for g in groups]))
                # each sample's own group b (b·w = 1 is uniform weight within its group)
                entry["group_b"] = self._put(torch.cat([bg.expand(x.numel()) for bg, x in zip(b, w)]))
                if docs:  # a fragment's uniform weight is pi_d: w / pi_d = 1 is uniform
                    pri = torch.cat([g.prior.detach().float() for g in groups])
                    entry["scale"] = self._put(torch.where(pri > 0, 1.0 / torch.where(pri > 0, pri, 1.0), 0.0))
            if want_hist or want_samples:
                entry["losses"] = self._put(torch.cat([g.losses.detach().reshape(-1) for g in groups]))
            entry["hist"] = want_hist
            entry["documents"] = docs
            if provenance is not None:
                entry["prov"] = list(provenance)
                entry["prov_index"] = list(provenance_index) if provenance_index is not None else None
                entry["samples"] = want_samples
                if want_samples and inputs is not None and self.decode is not None:
                    entry["inputs"] = self._put(inputs)
        if ntokens:
            self._ntokens += int(ntokens)
        self._pending.append(entry)

    def is_log_step(self, step: int) -> bool:
        """The one cadence rule: steps 1, every log_interval, and the last step read the device
        statistics (on every rank: the consecutive-skip check reads its counters on these steps)."""
        last = self.total_steps is not None and step >= self.total_steps
        return self._is_every(step, self.config.log_interval) or last

    def wants_samples(self, step: int) -> bool:
        """A samples table is due at `step` (the caller then keeps the step's input tokens)."""
        return self.enabled and self.config.top_k > 0 and self._is_every(step, self.config.samples_interval)

    def should_flush(self, step: int) -> bool:
        return self.enabled and self.is_log_step(step)

    def record_step(self, rec: "StepRecord") -> None:
        """The trainer's one call per optimizer step (device ops only); flushes on log steps."""
        extra: dict[str, Any] = {"lr": rec.lr, "grad_norm": rec.grad_norm.detach()}
        if rec.phase is not None:
            extra["phase"] = rec.phase
        if rec.faults is not None:
            extra.update(rec.faults.as_metrics())
        extra.update(rec.scores)  # eval/<task>/<metric>: host floats, on eval steps only
        prov = None if rec.provenance is None else self.layout.per_sample(rec.provenance)
        self.record(
            rec.step,
            rec.groups,
            temperature=rec.temperature,
            provenance=prov,
            provenance_index=self.layout.provenance_index(len(prov)) if prov is not None else None,
            inputs=rec.inputs,
            ntokens=rec.ntokens,
            extra=extra,
        )
        if self.is_log_step(rec.step):
            self.flush_and_report(rec.step)

    def flush_and_report(self, step: int) -> list[dict]:
        """Flush, warn about skipped steps, print the progress line (rank 0)."""
        rows = self.flush(step)  # the one device->host read of the interval
        for r in rows:
            if r.get("skipped", 0) > 0:
                why = (f"{int(r['nonfinite_samples'])} sample(s) with a non-finite loss"
                       if r.get("nonfinite_samples", 0) > 0 else f"non-finite gradient norm ({r.get('grad_norm')})")
                _log.warning(
                    f"step {r['step']}: {why}; optimizer step skipped "
                    f"({int(r.get('consecutive_skips', 0))} in a row, {int(r.get('skipped_steps', 0))} in the run)"
                )
        over = sum(int(r.get("overflow_rows", 0)) for r in rows)
        if over:
            _log.warning(f"steps {rows[0]['step']}-{rows[-1]['step']}: {over} row(s) held more documents than "
                         f"reweight.max_documents_per_row; each row's tail fragments were merged into its last slot "
                         f"and kept at their token share (overflow_rows in metrics.jsonl)")
        if rows and self.enabled:
            _log.info(self.progress.row_line(rows[-1]))
        return rows

    def before_checkpoint(self, _step: int) -> None:
        """Before a checkpoint is written: the rows of every step it covers go to metrics.jsonl
        (fsync'ed), so a hard kill after the save loses none of them."""
        self.flush_and_report(_step)
        self.sync()

    def resumed_at(self, step: int) -> None:
        """The console's rates count from the resumed step."""
        self.progress = Progress(self.total_steps or 0, start=step)

    # ------------------------------------------------------------------ at the interval (host)
    def flush(self, step: int | None = None) -> list[dict]:
        """Move the interval's device data to the host in one transfer; write metrics.jsonl and
        TensorBoard. Returns the rows written (for a console line)."""
        if not self.enabled or not self._pending:
            return []
        if self.failure is not None:  # a write failed: the trainer stops at its next check
            self._pending, self._dev, self._dev_len = [], [], 0
            return []
        flat = torch.cat(self._dev).cpu().numpy() if self._dev else np.zeros(0, np.float32)  # the one read
        pending, self._pending, self._dev, self._dev_len = self._pending, [], [], 0

        def get(slot):
            off, shape = slot
            n = int(np.prod(shape)) if shape else 1
            return flat[off : off + n].reshape(shape)

        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        tps = self._ntokens / dt if self._ntokens else None
        self._t_last, self._ntokens = now, 0

        rows, samples, tb = [], [], []
        for e in pending:
            v = get(e["row"])
            row: dict[str, Any] = {"step": e["step"]}
            for k, x in zip(_ROW, v[: len(_ROW)]):
                row[k] = float(x)
            row["b"] = int(round(row["b"]))
            row["bound_violations"] = int(round(row["bound_violations"]))
            self.violations_total += row["bound_violations"]
            row["bound_violations_total"] = self.violations_total
            row["max_weight_bound"] = (None if e.get("documents")  # per fragment: w_d <= c pi_d (max_weight_ratio)
                                       else self.config.bound_c / row["b"] if row["b"] else float("nan"))
            for k, x in zip(e["dev_keys"], v[len(_ROW) :]):
                row[k] = float(x)
            row.update(e["host"])
            if tps is not None:
                row.setdefault("tokens_per_sec", tps)
                if self.num_flops_per_token and self.peak_flops:
                    row.setdefault("mfu", 100.0 * self.num_flops_per_token * tps / self.peak_flops)
            row.update({k: v for k, v in self.static.items() if k not in row})
            weights = get(e["weights"]) if "weights" in e else None
            valid = get(e["valid"]) > 0.5 if "valid" in e else None
            losses = get(e["losses"]) if "losses" in e else None
            group_b = get(e["group_b"]) if "group_b" in e else None
            scale = get(e["scale"]) if "scale" in e else group_b  # w·scale = 1: uniform weight
            if "prov" in e:
                idx = e["prov_index"] if e["prov_index"] is not None else range(len(e["prov"]))
                idx = np.asarray(list(idx), dtype=np.int64)
                stats = _domain_stats_documents if e.get("documents") else _domain_stats
                row["domains"] = stats(e["prov"], idx, weights, valid, scale)
                if e.get("samples"):
                    inputs = get(e["inputs"]) if "inputs" in e else None
                    samples.append(self._samples(e["step"], e["prov"], idx, weights, valid, losses, inputs, group_b, scale))
            self._window.append((row["max_weight"], row["bound_ratio"]))
            rows.append(row)
            tb.append((row, e, weights, valid, losses, scale))
        try:
            for args in tb:
                self._write_tb(*args)
            self._write_window(rows[-1]["step"])
            self._write_jsonl(rows, samples)
            if self.writer is not None:
                for s in samples:
                    for which in ("top", "bottom"):
                        self.writer.add_text(TEXT_TAGS[which], _samples_markdown(s, which), s["step"])
                self.writer.flush()
        except OSError as err:  # a full disk, a quota, a read-only remount: one line, the run stops
            self._fail(err, rows[-1]["step"])
            return []
        return rows

    def _fail(self, err: OSError, step: int | None) -> None:
        self.failure = write_failure(err, self.metrics_path, step)
        for fh in (self._fh, self._samples_fh):  # their buffers would fail again on close
            if fh is not None:
                try:
                    fh.close()
                except OSError:
                    pass
        self._fh = self._samples_fh = None
        if self.writer is not None and self._own_writer:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - the event file is on the same full disk
                pass
        self.writer = None

    def _write_tb(self, row, e, weights, valid, losses, scale) -> None:
        wr = self.writer
        if wr is None:
            return
        step = row["step"]
        for k, x in row.items():
            if x is None:  # max_weight_bound under granularity = "document" (a bound per fragment)
                continue
            if k in SCALAR_TAGS:
                tag = SCALAR_TAGS[k]
            elif k in ("step", "b", "groups", "domains") or not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            else:
                tag = _extra_tag(k)
            wr.add_scalar(tag, float(x), step)
        for dom, d in (row.get("domains") or {}).items():
            wr.add_scalar(f"data/mean_weight/{dom}", d["mean_weight"], step)
            wr.add_scalar(f"data/share/{dom}", d["share"], step)
            wr.add_scalar(f"data/weight_mass/{dom}", d["weight_mass"], step)
        if e["hist"] and weights is not None and valid.any():
            if e.get("documents"):  # w_d / pi_d (1 = uniform), axis to the bound c
                _weight_histogram(wr, HIST_TAGS["weights"], weights[valid] * scale[valid], self.config.bound_c, step)
            else:
                _weight_histogram(wr, HIST_TAGS["weights"], weights[valid], row["max_weight_bound"], step)
            wr.add_histogram(HIST_TAGS["losses"], losses[valid].astype(np.float64), step)

    def _write_window(self, step: int) -> None:
        if self.writer is None or not self._window:
            return
        win = np.asarray(self._window, dtype=np.float64)
        ok = np.isfinite(win).all(axis=1)
        if ok.any():
            self.writer.add_histogram(WINDOW_TAGS["max_weight"], win[ok, 0], step)
            self.writer.add_histogram(WINDOW_TAGS["bound_ratio"], win[ok, 1], step)

    def _write_jsonl(self, rows, samples) -> None:
        if self._fh is None:
            self._fh = open(self.metrics_path, "a")
        for r in rows:
            self._fh.write(json.dumps(r) + "\n")
        self._fh.flush()
        if samples:
            if self._samples_fh is None:
                self._samples_fh = open(self.samples_path, "a")
            for s in samples:
                self._samples_fh.write(json.dumps(s) + "\n")
            self._samples_fh.flush()

    def _samples(self, step, prov, idx, weights, valid, losses, inputs, group_b, scale) -> dict:
        k = self.config.top_k
        ok = np.array([valid[i] and bool(_docs(p)) for i, p in zip(idx, prov)], dtype=bool)
        seen = int(ok.sum())  # provenance rows (or fragments) with a valid sample
        if self.layout.fragments_per_row > 1:  # shown: single documents, not an overflow row's merged tail
            ok &= np.array([not isinstance(p, list) for p in prov], dtype=bool)
        cand = np.nonzero(ok)[0]
        # ranked by b·w, each sample against uniform weight in its own group (the groups' b differ
        # when a group has invalid samples)
        cw, cl = weights[idx[cand]] * scale[idx[cand]], losses[idx[cand]]
        bs = sorted({int(round(x)) for x in group_b[idx[cand]]})  # the b of the groups shown
        # ties (LinUpper saturates every h >= 0 at the same weight): the higher loss ranks first
        top = cand[np.lexsort((-cl, -cw))][:k]
        bottom = cand[np.lexsort((cl, cw))][:k]
        ids = {d["doc_id"] for r in np.concatenate([top, bottom]) for d in [_main_doc(prov[r])] if d.get("doc_id")}
        found = self._lookup.find(ids, {_main_doc(prov[r]).get("shard") for r in np.concatenate([top, bottom])})

        def describe(r):
            d = _main_doc(prov[r])
            info = found.get(d.get("doc_id"), {})
            text = None
            if inputs is not None and self.decode is not None:
                F = self.layout.fragments_per_row
                tokens = inputs[r // F]
                if F > 1:  # the fragment's own tokens in its row
                    first = _docs(prov[r])[0]
                    off = int(first.get("row_offset", 0))
                    tokens = tokens[off: off + sum(int(x.get("n_tokens", 0)) for x in _docs(prov[r]))]
                try:
                    text = self.decode([int(t) for t in tokens])
                except Exception as ex:  # noqa: BLE001 - a snippet must never stop training
                    text = f"<decode failed: {ex}>"
            if text is None:
                text = info.get("text", "")
            return {
                "weight": float(weights[idx[r]]),
                # b·w with its own group's b (documents: w_d / pi_d); 1 = uniform weight
                "weight_x_b": float(weights[idx[r]]) * float(scale[idx[r]]),
                "loss": float(losses[idx[r]]),
                "domain": d.get("domain"),
                "doc_id": d.get("doc_id"),
                "url": info.get("url") or d.get("url"),
                "text": _snippet(text, self.config.snippet_chars),
            }

        return {
            "step": int(step),
            "b": bs[0] if len(bs) == 1 else bs,  # a list when the groups' b differ
            "rows_seen": seen,
            "top": [describe(r) for r in top],
            "bottom": [describe(r) for r in bottom],
        }

    # ------------------------------------------------------------------ lifecycle
    def state_dict(self) -> dict[str, Any]:
        return {"violations_total": self.violations_total, "window": list(self._window)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.violations_total = int(sd.get("violations_total", 0))
        self._window.clear()
        self._window.extend(tuple(x) for x in sd.get("window", []))

    def sync(self) -> None:
        """fsync the rows written so far (metrics and samples): called before a checkpoint that
        covers them is complete."""
        try:
            for fh in (self._fh, self._samples_fh):
                if fh is not None:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as err:
            self._fail(err, None)

    def close(self) -> None:
        """Flush what is pending and close the files (and the writer if this logger opened it)."""
        if not self.enabled:
            return
        try:
            self.flush()
        finally:
            try:
                for fh in (self._fh, self._samples_fh):
                    if fh is not None:
                        fh.close()
                self._fh = self._samples_fh = None
                if self.writer is not None:
                    self.writer.flush()
                    if self._own_writer:
                        self.writer.close()
                    self.writer = None
            except OSError as err:
                self._fail(err, None)


# ---------------------------------------------------------------------- provenance helpers
def _docs(p) -> list[dict]:
    if not p:
        return []
    if isinstance(p, Mapping):
        return [p]
    return [d for d in p if d]


def _main_doc(p) -> dict:
    """The document with the most tokens in the row (the row may start mid-document)."""
    docs = _docs(p)
    if not docs:
        return {}
    return max(docs, key=lambda d: d.get("n_tokens", 1))


def _domain_stats(prov, idx, weights, valid, group_b) -> dict[str, dict[str, float]]:
    """Per domain over the provenance rows: token share, mean b·w, share of the total weight.

    b is each sample's own group's b (under gradient accumulation in `microbatch` scope every
    micro-batch group's weights sum to 1 on their own), so b·w = 1 is uniform weighting, and the
    weight mass sums b·w: each group's samples count alike, whatever the groups' sizes."""
    share: dict[str, float] = collections.defaultdict(float)
    wsum: dict[str, float] = collections.defaultdict(float)
    rows = 0
    total_w = 0.0
    for i, p in zip(idx, prov):
        docs = _docs(p)
        if not docs or not valid[i]:
            continue
        rows += 1
        n = sum(max(d.get("n_tokens", 1), 0) for d in docs) or len(docs)
        w = float(weights[i]) * float(group_b[i])  # b·w
        total_w += w
        for d in docs:
            frac = (max(d.get("n_tokens", 1), 0) / n) if n else 1.0 / len(docs)
            dom = str(d.get("domain") or "unknown")
            share[dom] += frac
            wsum[dom] += frac * w
    out = {}
    for dom in sorted(share):
        out[dom] = {
            "share": share[dom] / rows,
            "mean_weight": wsum[dom] / share[dom] if share[dom] else float("nan"),
            "weight_mass": wsum[dom] / total_w if total_w > 0 else float("nan"),
        }
    return out


def _domain_stats_documents(prov, idx, weights, valid, scale) -> dict[str, dict[str, float]]:
    """granularity = "document": per domain over this rank's fragments, token-weighted: share of the
    tokens, mean w_d/pi_d (1 = uniform, the token-mean loss), share of the total weight."""
    tok: dict[str, float] = collections.defaultdict(float)
    ratio: dict[str, float] = collections.defaultdict(float)
    mass: dict[str, float] = collections.defaultdict(float)
    for i, p in zip(idx, prov):
        docs = _docs(p)
        if not docs or not valid[i]:
            continue
        dom = str(_main_doc(p).get("domain") or "unknown")
        n = float(sum(max(d.get("n_tokens", 1), 0) for d in docs))
        tok[dom] += n
        ratio[dom] += n * float(weights[i]) * float(scale[i])
        mass[dom] += float(weights[i])
    total_t, total_w = sum(tok.values()), sum(mass.values())
    return {dom: {"share": tok[dom] / total_t if total_t else float("nan"),
                  "mean_weight": ratio[dom] / tok[dom] if tok[dom] else float("nan"),
                  "weight_mass": mass[dom] / total_w if total_w > 0 else float("nan")} for dom in sorted(tok)}


def _snippet(text: str, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _md_cell(s: Any) -> str:
    return str("" if s is None else s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _samples_markdown(s: dict, which: str) -> str:
    title = "most" if which == "top" else "least"
    lines = [
        f"**{len(s[which])} {title} weighted of {s['rows_seen']} samples with provenance "
        f"(b = {s['b']}{' per group' if isinstance(s['b'], list) else ''})**",
        "",
        "| # | b·w | loss | domain | doc id | url | text |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(s[which], 1):
        lines.append(
            f"| {i} | {x['weight_x_b']:.3f} | {x['loss']:.3f} | {_md_cell(x['domain'])} | "
            f"{_md_cell(x['doc_id'])} | {_md_cell(x['url'])} | {_md_cell(x['text'])} |"
        )
    return "\n".join(lines)


class _DocLookup:
    """doc id -> {url, text} from FineWeb-schema parquet (filtered reads, small files only)."""

    def __init__(self, paths: Iterable[str], max_mb: float):
        self.extra = list(paths)
        self.max_bytes = max_mb * 1e6
        self.cache: dict[str, dict] = {}

    def _files(self, shards: Iterable[str | None]) -> list[str]:
        files = []
        for p in list(self.extra) + [s for s in shards if s]:
            if os.path.isdir(p):
                files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".parquet"))
            elif p.endswith(".parquet") and os.path.isfile(p):
                files.append(p)
        return list(dict.fromkeys(files))

    def find(self, ids: set[str], shards: Iterable[str | None]) -> dict[str, dict]:
        missing = {i for i in ids if i not in self.cache}
        if missing:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                return {i: self.cache[i] for i in ids if i in self.cache}
            for f in self._files(shards):
                if not missing or os.path.getsize(f) > self.max_bytes:
                    continue
                try:
                    names = set(pq.ParquetFile(f).schema_arrow.names)
                    if "id" not in names:
                        continue
                    cols = [c for c in ("id", "url", "text") if c in names]
                    t = pq.read_table(f, columns=cols, filters=[("id", "in", sorted(missing))])
                except Exception:  # noqa: BLE001 - lookup is best effort
                    continue
                for r in t.to_pylist():
                    self.cache[r["id"]] = {"url": r.get("url"), "text": (r.get("text") or "")[:4000]}
                    missing.discard(r["id"])
        return {i: self.cache[i] for i in ids if i in self.cache}


# ---------------------------------------------------------------------- reading back
def cut_torn_tail(path: str) -> int:
    """Cut a torn last line (bytes after the last newline) from the JSONL file `path`; the bytes
    cut (0 when the file ends with a newline or does not exist). A row is written whole with its
    newline, so bytes after the last one are a row cut short by a kill or a full disk."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        end, chunk = size, 1 << 16
        while end > 0:
            start = max(0, end - chunk)
            fh.seek(start)
            buf = fh.read(end - start)
            nl = buf.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        return size - keep


def _quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes event files from a thread, which prints its OSError (a full disk) as a
    traceback and raises it again at the writer's next call, where `RunLogger.flush` turns it into
    the one line of `write_failure`: the thread's copy is not printed (once per process)."""
    import threading

    prev = threading.excepthook
    if getattr(prev, "_titan_rw", False):
        return

    def hook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        prev(args)

    hook._titan_rw = True
    threading.excepthook = hook


_WRITE_ERRORS = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded",
                 "EROFS": "read-only file system", "EACCES": "permission denied"}


def write_failure(e: OSError, path: str, step: int | None) -> str:
    """The one line for a metrics file that could not be written (what, where, what to do)."""
    import errno as _errno

    what = next((v for k, v in _WRITE_ERRORS.items() if e.errno == getattr(_errno, k, None)), None)
    what = what or f"{e.strerror or type(e).__name__} (errno {e.errno})"
    where = getattr(e, "filename", None) or path
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
        free = f"; {st.f_bavail * st.f_frsize} bytes free there"
    except OSError:
        free = ""
    at = f" at step {step}" if step is not None else ""
    return (f"titan_rw logging: {what} while writing {where}{at}{free}; the run stopped without writing "
            f"another checkpoint, so every complete checkpoint and the metrics rows it covers are intact. "
            f"Free space and start the same command again: it resumes from the newest complete checkpoint "
            f"(the torn row is cut on open)")


def metrics_path(run_dir: str) -> str:
    return run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, METRICS_FILE)


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` (or a path to the file), sorted by step.

    A step logged twice (a run resumed from an earlier checkpoint) keeps its last row. A truncated
    last line (a run killed mid-write) is ignored; any other bad line raises with its number."""
    path = metrics_path(run_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a titan_rw run folder?)")
    with open(path) as fh:
        lines = fh.read().splitlines()
    by_step: dict[int, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{n}: expected a JSON object with a 'step' field")
        by_step[int(row["step"])] = row
    if not by_step:
        raise ValueError(f"{path}: empty metrics file (no step was logged yet)")
    return [by_step[s] for s in sorted(by_step)]


def read_samples(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, SAMPLES_FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def event_dirs(run_dir: str) -> list[str]:
    """Directories under run_dir holding TensorBoard event files."""
    out = []
    for root, _, files in os.walk(run_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            out.append(root)
    return sorted(out)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

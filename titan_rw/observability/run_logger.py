"""`RunLogger`: what the trainer calls, once per optimizer step (`record_step`), before a checkpoint
(`before_checkpoint`) and at the end (`close`). It holds the rooms of the flow together:

    record_step ─ device.step_metrics / sample_vectors ─> DeviceBuffer       (device ops only)
    flush       ─ DeviceBuffer.to_host (ONE transfer) ─> rows.IntervalRows ─> Interval
                ─> sinks: TensorBoardSink, WandbSink, JsonlSink; console.report

Only rank 0 (the `writer_rank`) writes; on other ranks every call is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from titan_rw.observability import console
from titan_rw.observability.device import DeviceBuffer, sample_vectors, step_metrics
from titan_rw.observability.jsonl import JsonlSink, write_failure
from titan_rw.observability.names import METRICS_FILE, SAMPLES_FILE
from titan_rw.observability.provenance import DocLookup, GroupLayout, SampleTables
from titan_rw.observability.rows import IntervalRows, PendingStep
from titan_rw.progress import Progress


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


def _every(step: int, n: int) -> bool:
    return step == 1 or step % n == 0


class RunLogger:
    @dataclass(kw_only=True, slots=True)
    class Config:
        """`[logging]`: what the run writes and how often (the TensorBoard and W&B switches are
        TorchTitan's `metrics.enable_tensorboard` / `metrics.enable_wandb`)."""

        metrics_file: str = METRICS_FILE
        """File under dump_folder that receives one JSON object per step (rank 0)."""
        samples_file: str = SAMPLES_FILE
        log_interval: int = 10
        """Steps between host reads of the on-device statistics (metrics.jsonl, TensorBoard, W&B,
        console); steps 1 and the last step flush too."""
        histogram_interval: int = 50
        """Histograms of the weights and per-sample losses every N steps (and step 1)."""
        samples_interval: int = 100
        """The top_k most / least weighted samples (text, doc id, URL) to samples.jsonl, TensorBoard
        and W&B every N steps (and step 1)."""
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

        def build_for(self, trainer) -> "RunLogger":
            """The `ReweightTrainer`'s logger: its rank and group layout, TorchTitan's TensorBoard
            writer and W&B run (`[metrics]`), MFU from TorchTitan's FLOPs (GPU only)."""
            from titan_rw.observability.tensorboard_sink import tb_writer_of
            from titan_rw.observability.wandb_sink import wandb_run_of

            c, mp = trainer.config, trainer.metrics_processor
            per_row = trainer.max_documents_per_row
            return self.build(
                c.dump_folder, rank=trainer.rank, writer=tb_writer_of(mp), tensorboard=c.metrics.enable_tensorboard,
                wandb_run=wandb_run_of(mp),
                layout=GroupLayout(trainer.gradient_accumulation_steps, c.training.local_batch_size * per_row,
                                   trainer.dp_rank, trainer.dp_size, max_documents_per_row=per_row),
                static={"strategy": c.reweight.strategy}, total_steps=c.training.steps,
                num_flops_per_token=mp.num_flops_per_token,
                peak_flops=getattr(mp, "gpu_peak_flops", None) if trainer.device.type == "cuda" else None,
                decode=getattr(trainer.tokenizer, "decode", None))

    def __init__(self, config: "RunLogger.Config", *, dump_folder: str, rank: int = 0, writer_rank: int = 0,
                 writer: Any | None = None, tb_dir: str | None = None, tensorboard: bool = True,
                 wandb_run: Any | None = None, layout: GroupLayout | None = None,
                 num_flops_per_token: float | None = None, peak_flops: float | None = None, decode=None,
                 static: Mapping[str, Any] | None = None, total_steps: int | None = None):
        """`writer`: an existing SummaryWriter (e.g. `tb_writer_of(trainer.metrics_processor)`);
        `tensorboard`: write event files (own writer under <dump_folder>/tb/<time> unless `writer`);
        `wandb_run`: a W&B run to log to (`wandb_run_of(trainer.metrics_processor)`).
        `num_flops_per_token`, `peak_flops`: MFU = 100 · flops/token · tokens/s per device / peak.
        `decode(list[int]) -> str`: renders the sample snippets from the step's `inputs`.
        `static`: constant fields copied into every metrics.jsonl row (e.g. {"strategy": "linupper"}).
        `total_steps`: the last step always flushes.
        `layout`: where this rank's samples sit in a step's groups (`record_step`'s provenance)."""
        config.validate()
        self.config = config
        self.enabled = rank == writer_rank
        self.total_steps = total_steps
        self.layout = layout or GroupLayout()
        self.progress = Progress(total_steps or 0)
        self.metrics_path = os.path.join(dump_folder, config.metrics_file)
        self._pending: list[PendingStep] = []
        self._device = DeviceBuffer()
        tables = SampleTables(top_k=config.top_k, snippet_chars=config.snippet_chars, decode=decode,
                              lookup=DocLookup(config.lookup_parquet, config.lookup_max_mb),
                              max_documents_per_row=self.layout.max_documents_per_row)
        self._rows = IntervalRows(bound_c=config.bound_c, window=config.max_weight_window, tables=tables,
                                  static=static or {}, num_flops_per_token=num_flops_per_token, peak_flops=peak_flops)
        self.sinks: list = []
        self.tb_dir = None
        self.failure: str | None = None  # one line once a write failed; nothing is written after it
        if not self.enabled:
            return
        os.makedirs(dump_folder, exist_ok=True)
        jsonl = JsonlSink(self.metrics_path, os.path.join(dump_folder, config.samples_file))
        if tensorboard:
            from titan_rw.observability.tensorboard_sink import TensorBoardSink

            tb = TensorBoardSink(dump_folder, writer=writer, tb_dir=tb_dir)
            self.tb_dir = tb.tb_dir
            self.sinks.append(tb)
        if wandb_run is not None:
            from titan_rw.observability.wandb_sink import WandbSink

            self.sinks.append(WandbSink(wandb_run))
        self.sinks.append(jsonl)
        self._jsonl = jsonl

    # ------------------------------------------------------------------ per step (device only)
    def record(self, step: int, stats, *, temperature: float | torch.Tensor | None,
               provenance: Sequence[Any] | None = None, provenance_index: Sequence[int] | None = None,
               inputs: torch.Tensor | None = None, ntokens: int | None = None,
               extra: Mapping[str, float | int | torch.Tensor] | None = None) -> None:
        """Store one optimizer step. No host synchronisation: only device ops and references.

        stats: a `titan_rw.loss.WeightStats`, or a sequence of them (one per micro-batch group).
        provenance: host-side per-sample info (the loader's `last_provenance`: per row a list of
            document dicts with domain, doc_id, n_tokens, ...; a single dict per row also works).
        provenance_index: the position of each provenance row in the step's samples (the groups'
            samples concatenated in order). Default 0..len-1: rank 0's rows of a single group.
        inputs: optional token ids [rows, L] aligned with provenance; with `decode`, the sample
            snippets show exactly the text the model saw (kept only on sample steps).
        ntokens: tokens this device processed in the step (for tokens/s and MFU).
        extra: more named values (lr, grad_norm, fault counters, ...); tensors stay on device.
        """
        if not self.enabled:
            return
        groups = list(stats) if isinstance(stats, (list, tuple)) else [stats]
        if not groups:
            raise ValueError("RunLogger.record: no WeightStats given")
        documents = groups[0].prior is not None
        named = step_metrics(groups, self.config.bound_c, self.config.bound_tol)
        host: dict[str, Any] = {"groups": len(groups)}
        if documents:
            host["granularity"] = "document"
        if isinstance(temperature, torch.Tensor):
            named["temperature"] = temperature
        else:  # None in a uniform burn-in: null in metrics.jsonl, no chart point
            host["temperature"] = None if temperature is None else float(temperature)
        for k, v in (extra or {}).items():
            if isinstance(v, torch.Tensor):
                named[k] = v
            else:
                host[k] = v
        names, slot = self._device.put_named(named)
        e = PendingStep(step=int(step), names=names, slot=slot, host=host, documents=documents,
                        histogram=_every(step, self.config.histogram_interval))
        if provenance is not None:
            e.prov = list(provenance)
            e.prov_index = list(provenance_index) if provenance_index is not None else None
            e.samples = self.config.top_k > 0 and _every(step, self.config.samples_interval)
        if e.histogram or e.prov is not None:
            e.vectors = self._device.put_vectors(sample_vectors(groups, losses=e.histogram or e.samples))
            if e.samples and inputs is not None and self._rows.tables.decode is not None:
                e.vectors["inputs"] = self._device.put(inputs)
        if ntokens:
            self._rows.ntokens += int(ntokens)
        self._pending.append(e)

    def is_log_step(self, step: int) -> bool:
        """The one cadence rule: steps 1, every log_interval, and the last step read the device
        statistics (on every rank: the consecutive-skip check reads its counters on these steps)."""
        last = self.total_steps is not None and step >= self.total_steps
        return _every(step, self.config.log_interval) or last

    def wants_samples(self, step: int) -> bool:
        """A samples table is due at `step` (the caller then keeps the step's input tokens)."""
        return self.enabled and self.config.top_k > 0 and _every(step, self.config.samples_interval)

    def record_step(self, rec: StepRecord) -> None:
        """The trainer's one call per optimizer step (device ops only); flushes on log steps."""
        extra: dict[str, Any] = {"lr": rec.lr, "grad_norm": rec.grad_norm.detach()}
        if rec.phase is not None:
            extra["phase"] = rec.phase
        if rec.faults is not None:
            extra.update(rec.faults.as_metrics())
        extra.update(rec.scores)  # eval/<task>/<metric>: host floats, on eval steps only
        if rec.scores and self.enabled:
            console.eval_scores(rec.step, rec.scores)
        prov = None if rec.provenance is None else self.layout.per_sample(rec.provenance)
        self.record(rec.step, rec.groups, temperature=rec.temperature, provenance=prov,
                    provenance_index=self.layout.provenance_index(len(prov)) if prov is not None else None,
                    inputs=rec.inputs, ntokens=rec.ntokens, extra=extra)
        if self.is_log_step(rec.step):
            self.flush_and_report()

    # ------------------------------------------------------------------ at the interval (host)
    def flush(self) -> list[dict]:
        """Move the interval's device data to the host in one transfer, build its named rows and
        hand them to every sink. Returns the rows written."""
        if not self.enabled or not self._pending:
            return []
        if self.failure is not None:  # a write failed: the trainer stops at its next check
            self._pending = []
            self._device.clear()
            return []
        host = self._device.to_host()  # the one read
        pending, self._pending = self._pending, []
        iv = self._rows.build(pending, host)
        try:
            for sink in self.sinks:
                sink.write(iv)
            for sink in self.sinks:
                if hasattr(sink, "write_samples"):
                    sink.write_samples(iv)
        except OSError as err:  # a full disk, a quota, a read-only remount: one line, the run stops
            self._fail(err, iv.rows[-1]["step"])
            return []
        return iv.rows

    def flush_and_report(self) -> list[dict]:
        """Flush, then the console: skipped steps, overflow rows, the progress line (rank 0)."""
        rows = self.flush()  # the one device->host read of the interval
        if self.enabled:
            console.report(rows, self.progress)
        return rows

    def _fail(self, err: OSError, step: int | None) -> None:
        self.failure = write_failure(err, self.metrics_path, step)
        for sink in self.sinks:
            sink.abandon()
        self.sinks = []

    # ------------------------------------------------------------------ lifecycle
    def before_checkpoint(self, _step: int) -> None:
        """Before a checkpoint is written: the rows of every step it covers go to metrics.jsonl
        (fsync'ed), so a hard kill after the save loses none of them."""
        self.flush_and_report()
        self.sync()

    def resumed_at(self, step: int) -> None:
        """The console's rates count from the resumed step."""
        self.progress = Progress(self.total_steps or 0, start=step)

    def state_dict(self) -> dict[str, Any]:
        return self._rows.state_dict()

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._rows.load_state_dict(sd)

    def sync(self) -> None:
        """fsync the rows written so far (metrics and samples): called before a checkpoint that
        covers them is complete."""
        if not self.enabled or self._jsonl not in self.sinks:
            return
        try:
            self._jsonl.sync()
        except OSError as err:
            self._fail(err, None)

    def finish(self) -> bool:
        """The trainer's close: `close`, an error in it only a warning (it must not mask the error
        that ended the run); False when a write failed (the run said so in one line already)."""
        try:
            self.close()
        except Exception as e:  # noqa: BLE001  closing must not mask the original error
            console.log.warning(f"titan_rw: could not flush the last metrics: {e}")
        return self.failure is None

    def close(self) -> None:
        """Flush what is pending and close the sinks (a writer or W&B run passed in stays open)."""
        if not self.enabled:
            return
        try:
            self.flush()
        finally:
            try:
                for sink in self.sinks:
                    sink.close()
                self.sinks = []
            except OSError as err:
                self._fail(err, None)

"""`ReweightTrainer`: TorchTitan 0.3.0's Trainer with the paper's online sample reweighting.

Everything but the step is TorchTitan's, unchanged: parallelize_llama (AC, per-block compile,
FSDP2), the optimizer and LR containers, the DCP checkpointer, the dataloader protocol and the
MetricsProcessor's TensorBoard writer. The step (Algorithm 1):

1. the model runs with `_skip_lm_head=True` (TorchTitan's final RMSNorm is applied, the output
   projection is not); `titan_rw.loss.per_sample_loss` turns the hidden states into per-sample
   mean token NLLs f_i through a chunked, recomputing projection (no [B, T, V] fp32 logits);
2. `titan_rw.loss.reweighted_loss` all-gathers the detached f over the data-parallel ("batch")
   mesh only, computes the weights of the whole group, keeps this rank's slice by its DP-mesh
   rank and returns  Σ_local w_i f_i ; FSDP sums gradients across DP ranks (divide factor 1),
   so the step's gradient is exactly  Σ_global w_i ∇f_i ;
3. the optimizer step goes through `titan_rw.faults.NonFiniteSkipOptimizers` (a non-finite step is
   dropped on device); statistics stay on device and the `RunLogger` (titan_rw.observability)
   reads them to the host once per `logging.log_interval` steps (metrics.jsonl, samples.jsonl,
   TensorBoard, W&B, the console line); `titan_rw.faults.StopGuard` stops the run after a
   checkpoint on a signal or too many skipped steps.

The components, each with its own config section: `[reweight]` ReweightConfig (titan_rw.reweight),
`[logging]` RunLogger, `[fault]` StopGuard, `[fault_injection]` FaultInjection (tests only),
`[periodic_eval]` PeriodicEvalConfig, `[checkpoint]` ResumableCheckpointManager.

Gradient accumulation (k micro-batches per optimizer step):
- scope "microbatch" (default, the paper's behaviour): each micro-batch is its own group of
  b = local_batch × dp samples; its loss is divided by k. The logged bound is 2/b with this b.
- scope "global_batch": exact weights over the whole optimizer step (b = global batch). The
  cheapest exact scheme: a no-grad forward pre-pass over the k micro-batches computes every
  f_i, one all-gather of the k·b_local losses gives the weights, then the usual forward +
  backward per micro-batch uses the fixed weights. Cost: one extra forward without
  activations (≈ +1/3 of a step's FLOPs, ≈ +25 % with activation recomputation) and one extra
  FSDP all-gather of the parameters per micro-batch; no extra activation memory. With k = 1
  both scopes are identical and no pre-pass runs.
"""

from __future__ import annotations

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import spmd_types as spmd
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import utils as dist_utils
from torchtitan.observability import structured_logger as sl
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from titan_rw import compat
from titan_rw.eval.periodic import PeriodicEvalConfig
from titan_rw.fault_injection import FaultInjection
from titan_rw.faults import NonFiniteSkipOptimizers, RowAudit, StopGuard
from titan_rw.float8 import check_model as check_float8_model
from titan_rw.loss import (IGNORE_INDEX, ReweightSettings, group_weights, per_document_loss, per_sample_loss,
                           reweighted_loss, weighted_sum)
from titan_rw.models import FLAVORS, describe, portable_init
from titan_rw.observability.run_logger import FaultCounters, RunLogger, StepRecord
from titan_rw.observability.wandb_sink import require_wandb
from titan_rw.reweight import ReweightConfig
from titan_rw.train_state import TrainState

# Parallelisms the reweighted step cannot run under, and why (checked by the trainer itself, before
# TorchTitan builds anything; titan_rw.config refuses them earlier with the file's name).
_UNSUPPORTED_PARALLELISM = {
    "tensor_parallel_degree": "the per-sample loss projects each row's hidden states onto the full "
                              "vocabulary on one rank (no vocabulary-sharded logits)",
    "context_parallel_degree": "a sample's loss would be split over the ranks that hold its sequence "
                               "shards, and the weights need whole-sample losses",
    "pipeline_parallel_degree": "the step runs the model and the per-sample loss in one forward, "
                                "not as pipeline stages",
    "expert_parallel_degree": "the Llama flavors have no experts",
}


def _check_parallelism(par) -> None:
    """TP/CP/PP/EP are refused here too, not only by the config loader: a `ReweightTrainer.Config`
    built in Python must not reach a step that would compute wrong weights."""
    for key, why in _UNSUPPORTED_PARALLELISM.items():
        degree = getattr(par, key)
        if degree != 1:
            raise ValueError(
                f"titan_rw: parallelism.{key} = {degree} is not supported by the reweighted step: {why}. "
                "Set it to 1 and scale with data parallelism (FSDP: parallelism.data_parallel_shard_degree; "
                "HSDP: also parallelism.data_parallel_replicate_degree)."
            )


def _no_cuda_graph_capture(training) -> None:
    """TorchTitan 0.3.0 captures `_forward_backward_body` in a CUDA graph unless
    `training.disable_cuda_graphs`; a replay runs no Python, and the reweighted body has host-side
    effects a replay would skip (the per-group WeightStats list, the micro-batch counters, the
    global-batch scope's fixed weights, the temperature tensor replaced after the warm-up): the run
    would fail or train with stale weights. So the capture is off, always (titan_rw.config refuses
    `training.disable_cuda_graphs = false`)."""
    was = training.disable_cuda_graphs
    training.disable_cuda_graphs = True
    logger.info(
        "titan_rw: CUDA-graph capture of the step is off (training.disable_cuda_graphs = true"
        + ("" if was else ", forced") + "): the reweighted step keeps host-side state that a graph replay would skip"
    )


def _skipping_optimizer(opt) -> NonFiniteSkipOptimizers.Config:
    """TorchTitan's optimizer config as `NonFiniteSkipOptimizers.Config` (same fields)."""
    if isinstance(opt, NonFiniteSkipOptimizers.Config):
        return opt
    return NonFiniteSkipOptimizers.Config(**{f.name: getattr(opt, f.name) for f in dataclasses.fields(OptimizersContainer.Config)})


def describe_reweighting(rw: ReweightConfig, *, group_b: int, accumulation: int, max_documents_per_row: int,
                         dp_size: int) -> str:
    """The run's one reweighting line: strategy, temperature schedule, cap, scope and group size b."""
    return (
        f"titan_rw reweighting: strategy={rw.strategy} r={rw.temperature} "
        + (f"(uniform burn-in for {rw.warmup_steps} steps, then {rw.anneal}) " if rw.warmup_mode == "uniform"
           else f"(warm-up r={rw.warmup_temperature} for {rw.warmup_steps} steps, {rw.anneal}) ")
        + f"cap={rw.cap} "
        f"scope={rw.scope} b={group_b if rw.scope == 'microbatch' else group_b * accumulation} "
        + (f"rows, granularity=document (≤ {max_documents_per_row} fragments per row, < {rw.min_document_tokens} tokens "
           f"kept at their token share) " if max_documents_per_row > 1 else "") +
        f"dp={dp_size} accumulation={accumulation}"
    )


class ReweightTrainer(TrainState, Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        reweight: ReweightConfig = field(default_factory=ReweightConfig)
        logging: RunLogger.Config = field(default_factory=RunLogger.Config)
        fault: StopGuard.Config = field(default_factory=StopGuard.Config)
        fault_injection: FaultInjection.Config = field(default_factory=FaultInjection.Config)
        periodic_eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
        portable_init: bool = True
        """Initialize the weights on rank 0 as one full model (seed `debug.seed`) and broadcast
        them (titan_rw.models.portable_init): the initial weights do not depend on the world size."""
        run_values: dict = field(default_factory=dict)
        """The resolved run config {section: {key: value}} (titan_rw.config): stored in every
        checkpoint for the resume check."""

    def __init__(self, config: Config):
        compat.log_applied(logger)
        for section in (config.reweight, config.logging, config.fault, config.periodic_eval):
            section.validate()
        _check_parallelism(config.parallelism)
        require_wandb(config.metrics.enable_wandb)
        _no_cuda_graph_capture(config.training)
        config.optimizer = _skipping_optimizer(config.optimizer)
        super().__init__(config)
        self.rw = rw = config.reweight
        self.temperature_schedule = rw.schedule()
        dist = torch.distributed
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if self.parallel_dims.dp_enabled:
            mesh = self.parallel_dims.get_mesh("batch")
            self.dp_group, self.dp_rank, self.dp_size = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        else:
            self.dp_group, self.dp_rank, self.dp_size = None, 0, 1
        self.group_b = config.training.local_batch_size * self.dp_size  # rows per group
        # samples per row: reweight.max_documents_per_row fragment slots (granularity = "document"), else 1
        self.max_documents_per_row = rw.max_documents_per_row if rw.granularity == "document" else 1
        self.tokens_per_step = self.gradient_accumulation_steps * self.group_b * config.training.seq_len

        model = self.model_parts[0]
        if config.portable_init and not config.checkpoint.create_seed_checkpoint:
            portable_init(model, self.model_config, config.debug.seed or 0)
        model._skip_lm_head = True  # the per-sample loss applies the output projection itself
        check_float8_model(model)  # the output projection stays high precision (titan_rw.float8)
        self.lm_head = model.lm_head
        self._weighted = reweighted_loss
        if config.compile.enable and "loss" in config.compile.components:
            # gather → weights → weighted loss: one compiled region
            self._weighted = torch.compile(reweighted_loss, backend=config.compile.backend)

        self._groups: list[Any] = []  # WeightStats of the current step's groups
        self._temperature_value: float | None = None  # host copy of self._temperature_t
        self._reweighting = ReweightSettings.of(rw, self.dp_group, self.dp_rank, self.dp_size)
        self._burn_in_settings = self._reweighting.uniform()  # warmup_mode = "uniform": exactly uniform weights
        self._settings = self._reweighting  # this step's
        if self.rank == 0:
            os.makedirs(config.dump_folder, exist_ok=True)
        self.run_logger = config.logging.build_for(self)
        # provenance of rank 0's rows (only rank 0 writes metrics / samples)
        self._want_provenance = self.rank == 0 and hasattr(self.dataloader, "last_provenance")
        self.stop_guard = config.fault.build(rank=self.rank, world_size=self.world_size, device=self.device)
        self.injector = config.fault_injection.build(model=model, rank=self.rank, dp_rank=self.dp_rank)
        self.audit = (RowAudit(config.dump_folder, self.rank)
                      if config.fault.audit_rows and hasattr(self.dataloader, "last_provenance") else None)
        self._nonfinite_now = torch.zeros((), dtype=torch.int64, device=self.device)
        self._fb_calls = 0
        self._resumed = False  # resume() ran (train.py calls it before saving the run config)
        if hasattr(self.checkpointer, "before_save"):  # ResumableCheckpointManager: docs/resuming.md
            self.checkpointer.run_values = config.run_values  # checked against the checkpoint's on resume
            self.checkpointer.before_save = self._before_checkpoint
        if config.model_spec is not None and config.model_spec.flavor in FLAVORS:
            logger.info(describe(config.model_spec.flavor))
        logger.info(describe_reweighting(rw, group_b=self.group_b, accumulation=self.gradient_accumulation_steps,
                                         max_documents_per_row=self.max_documents_per_row, dp_size=self.dp_size))

    # ------------------------------------------------------------------ the step's body
    def _per_sample(self, inputs, labels, extra_kwargs, mb_index: int = 0):
        """(f [n], valid [n], document extras {} or {n_tokens, merged}): a sample
        is a row, or (granularity = "document") a document fragment, n = rows × max_documents_per_row."""
        self.injector.before_forward(mb_index)
        hidden = self.model_parts[0](inputs, **extra_kwargs)
        rw = self.rw
        if rw.granularity == "row":
            losses, n_valid = per_sample_loss(self.lm_head, hidden, labels, num_chunks=rw.loss_chunks)
            return losses, n_valid > 0, {}
        d = per_document_loss(self.lm_head, hidden, labels, self._positions(inputs, extra_kwargs),
                              max_documents_per_row=rw.max_documents_per_row, num_chunks=rw.loss_chunks)
        n_tokens = d.n_tokens.reshape(-1)
        return d.losses.reshape(-1), n_tokens > 0, {"n_tokens": n_tokens, "merged": d.merged.reshape(-1)}

    @staticmethod
    def _positions(inputs, extra_kwargs) -> torch.Tensor:
        """Where documents start (0): the loader's positions; without them every row is one document."""
        pos = extra_kwargs.get("positions")
        if pos is None:
            return torch.arange(inputs.shape[1], device=inputs.device).expand(inputs.shape[0], -1)
        return pos.expand(inputs.shape[0], -1) if pos.dim() == 1 or pos.shape[0] == 1 else pos

    def _forward_backward_body(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
        extra_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        k = self.gradient_accumulation_steps
        with self.train_context():
            losses, valid, docs = self._per_sample(inputs, labels, extra_kwargs, self._fb_calls)
            self._fb_calls += 1
            if self._fixed_weights is None:  # microbatch scope: this micro-batch is the group
                loss, stats = self._weighted(  # Alg. 1 lines 4-8: gather, Eq. (4), Σ_local w_i f_i
                    losses, self._temperature_t, self._settings, valid=valid, **docs)
                self._groups.append(stats)
                loss = loss / k
            else:  # global_batch scope: weights fixed by the pre-pass
                loss = weighted_sum(self._fixed_weights[self._mb_index], losses)
                self._mb_index += 1
            with spmd.no_typecheck():
                loss.backward()
        return loss.detach()

    @torch.no_grad()
    def _global_batch_weights(self, microbatches) -> None:
        """Pre-pass for scope=global_batch: f_i of all k micro-batches without activations, then the
        weights of the whole optimizer step (one group of k·b samples), fixed for the grad pass."""
        losses, valid, docs = [], [], []
        for j, (input_dict, labels) in enumerate(microbatches):
            inputs, labels, extra_kwargs = self.post_dataloading_process(input_dict, labels)
            with self.train_context():
                f, ok, d = self._per_sample(inputs, labels, extra_kwargs, j)
            losses.append(f.float())
            valid.append(ok)
            docs.append(d)
        self.ntokens_seen -= sum(lbl.numel() for _, lbl in microbatches)  # counted again in the grad pass
        extra = {} if not docs[0] else {"n_tokens": torch.stack([d["n_tokens"] for d in docs]),
                                        "merged": torch.stack([d["merged"] for d in docs])}
        w, stats = group_weights(torch.stack(losses), torch.stack(valid), self._temperature_t, self._settings, **extra)
        self._fixed_weights = list(w)
        self._mb_index = 0
        self._groups.append(stats)

    # ------------------------------------------------------------------ the optimizer step
    def _set_temperature(self, temperature: float) -> None:
        """The step's temperature as a device scalar; a new tensor (a host→device copy) only when
        the value changes (after warm-up: never, for the constant schedule)."""
        if temperature != self._temperature_value:
            self._temperature_t = torch.tensor(temperature, dtype=torch.float32, device=self.device)
            self._temperature_value = temperature

    def train_step(self, data_iterator: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]):
        self.optimizers.zero_grad(set_to_none=True)
        lr = next(iter(self.lr_schedulers.get_metrics().values()), float("nan"))
        # Appendix A.2: r of this step, or None in a uniform burn-in (warmup_mode = "uniform"): then
        # the step's weights are exactly uniform (strategy "uniform", no cap needed). A host-side
        # decision from the step number, no device read.
        temperature = self.temperature_schedule(self.step)
        burn_in = temperature is None
        self._settings = self._burn_in_settings if burn_in else self._reweighting
        if not burn_in:
            self._set_temperature(temperature)
        elif self._temperature_value is None:  # unused by "uniform", but the call takes a device scalar
            self._set_temperature(self.rw.temperature)
        self._groups, self._fixed_weights, self._fb_calls = [], None, 0
        self.injector.before_step(self.step)

        microbatches = []
        provenance: list | None = [] if (self._want_provenance or self.audit is not None) else None
        local_valid_tokens = torch.tensor(0, dtype=torch.int64)
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(data_iterator)
            if provenance is not None:  # rows of the batch just served (host lists)
                provenance.extend(self.dataloader.last_provenance)
            local_valid_tokens += (labels != IGNORE_INDEX).sum()
            input_dict = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in input_dict.items()}
            microbatches.append((input_dict, labels.to(self.device)))
        global_valid_tokens = local_valid_tokens.to(self.device)  # unused by the reweighted body
        sample_inputs = None
        if self._want_provenance and self.run_logger.wants_samples(self.step):
            sample_inputs = torch.cat([mb[0]["input"] for mb in microbatches])

        if self.rw.scope == "global_batch" and self.gradient_accumulation_steps > 1:
            self._global_batch_weights(microbatches)
        for input_dict, labels in microbatches:
            self.forward_backward_step(input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)
        del microbatches
        if self.audit is not None:  # the weights this rank's loss used, read at the next flush
            self.audit.record(self.step, self.dp_rank, RowAudit.rows(provenance),
                              torch.cat([g.rank_weights for g in self._groups]))
        self.injector.after_backward(self.step, self.model_parts)

        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.config.training.max_norm,
            foreach=True,
            pp_mesh=None,
            ep_enabled=self.parallel_dims.ep_enabled,
        )
        self.checkpointer.maybe_wait_for_staging()
        # NaN/inf losses of the step's groups (gathered over DP: every rank counts the same)
        self._nonfinite_now = sum(((~torch.isfinite(g.losses)).sum() for g in self._groups),
                                  torch.zeros((), dtype=torch.int64, device=self.device))
        self.optimizers.step_unless_nonfinite(grad_norm, self._nonfinite_now)
        self.lr_schedulers.step()

        pe = self.config.periodic_eval
        scores = pe.scores(self.step, self.model_parts[0], self.tokenizer, max_length=self.config.training.seq_len)
        o = self.optimizers
        self.run_logger.record_step(StepRecord(
            step=self.step, groups=self._groups, temperature=temperature, lr=lr, grad_norm=grad_norm,
            phase=self.temperature_schedule.phase(self.step),
            ntokens=self.tokens_per_step // self.dp_size, scores=scores,
            faults=FaultCounters(self._nonfinite_now, o.skipped_now, o.skipped_total, o.consecutive),
            provenance=provenance if self._want_provenance else None, inputs=sample_inputs,
        ))
        if self.audit is not None and self.run_logger.is_log_step(self.step):
            self.audit.flush()

    # ------------------------------------------------------------------ the loop
    @record
    def train(self):
        """TorchTitan's loop, plus: resume from the newest complete checkpoint (logged; `resume()`
        unless the caller did), the stop checks after each step, the testing knobs."""
        config = self.config
        sl.log_trace_instant("training_start")
        if not self._resumed:
            self.resume()
        loaded_step = self.step
        logger.info(f"Training starts at step {self.step + 1}")
        with config.profiler.build(global_step=self.step, base_folder=config.dump_folder) as profiler:
            data_iterator = self.batch_generator(self.dataloader)
            while self.should_continue_training():
                self.step += 1
                sl.set_step(self.step, relative_step=self.step - loaded_step)
                with sl.log_trace_span("step"):
                    self.gc_handler.run(self.step)
                    try:
                        self.train_step(data_iterator)
                    except DataloaderExhaustedError:
                        logger.warning("Ran out of data; last step was canceled.")
                        break
                    self.checkpointer.save(self.step, last_step=(self.step == config.training.steps))
                    if self.config.validator.enable and self.validator.should_validate(self.step):
                        self.validator.validate(self.model_parts, self.step)
                    profiler.step()
                    if self.step - loaded_step == 1:
                        dist_utils.set_pg_timeouts(
                            timeout=timedelta(seconds=config.comm.train_timeout_seconds),
                            parallel_dims=self.parallel_dims,
                        )
                    self.injector.after_step(self.step)
                    why = self.stop_guard.stop_reason(self.step, config.training.steps, self.optimizers,
                                                      self.run_logger.is_log_step(self.step),
                                                      write_failure=self.run_logger.failure)
                    if why is not None:
                        saved = self.checkpointer.save_now(self.step)
                        self.stop_guard.stop(self.step, why, os.path.join(self.checkpointer.folder, f"step-{self.step}")
                                             if saved else None)
        self.checkpointer.maybe_wait_for_saving()
        logger.info("Training completed")

    def _before_checkpoint(self, step: int) -> None:
        """The checkpointer's `before_save`: the covered steps' metrics rows (rank 0) and audit lines
        on disk, then every rank agrees that they are; if rank 0 could not write them (a full disk),
        the run stops without this checkpoint (exit 1, docs/resuming.md "Torn lines, full disk")."""
        self.run_logger.before_checkpoint(step)
        if self.audit is not None:
            self.audit.flush()
        self.stop_guard.check_before_save(step, self.run_logger.failure)

    def close(self) -> None:
        write_failed = self.run_logger is not None and not self.run_logger.finish()  # idempotent
        self.run_logger = None
        for part in ("audit", "stop_guard"):
            if getattr(self, part) is not None:
                getattr(self, part).close()
                setattr(self, part, None)
        try:
            super().close()
        except OSError:  # TorchTitan's TensorBoard writer on the disk that filled: already said in one line
            if not write_failed:
                raise


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
3. statistics stay on device; `titan_rw.observability.RunLogger` reads them to the host once per
   `log_interval` steps and writes `<dump_folder>/metrics.jsonl`, samples.jsonl and TensorBoard
   (rank 0), with the loader's provenance of rank 0's rows; `titan_rw.progress.Progress` prints
   the console line. The resolved config is saved as `<dump_folder>/config.json` and
   `run_config.toml` when training starts, after the resume check (docs/resuming.md).

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

import json
import os
import pickle
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Literal

import numpy as np

import spmd_types as spmd
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.distributed import utils as dist_utils
from torchtitan.observability import structured_logger as sl
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from titan_rw import compat
from titan_rw.loss import IGNORE_INDEX, WeightStats, gather_losses, per_sample_loss, reweighted_loss
from titan_rw.observability import RunLogger, tb_writer_of
from titan_rw.progress import Progress
from titan_rw.reweight import STRATEGIES, TemperatureSchedule, sample_weights


@dataclass(kw_only=True, slots=True)
class ReweightConfig:
    strategy: str = "linupper"
    """One of uniform, linupper, quadratic, extremes, dro_kl (docs/design.md §2)."""
    temperature: float = 1.0
    """Target temperature r (paper: 1.0 for 1.4B, 2.0 for 7B)."""
    warmup_temperature: float = 100.0
    """Temperature during the warm-up steps (Appendix A.2: r = 100)."""
    warmup_steps: int = 0
    """Steps at warmup_temperature before the target."""
    anneal: Literal["constant", "linear", "cosine"] = "constant"
    """How the temperature goes from warmup_temperature to temperature after the warm-up."""
    anneal_steps: int = 0
    """Length of a linear/cosine anneal."""
    cap: float | None = None
    """Cap c ≥ 1: project weights onto w_i ≤ c/b (c = 2 guarantees Theorem 1's precondition)."""
    scope: Literal["microbatch", "global_batch"] = "microbatch"
    """Reweighting group under gradient accumulation (see module docstring for the cost)."""
    log_interval: int = 10
    """Steps between host reads of the on-device statistics (metrics.jsonl, TensorBoard, console)."""
    histogram_interval: int = 50
    """TensorBoard histograms of the weights and per-sample losses every N steps (and step 1)."""
    samples_interval: int = 100
    """The top_k most / least weighted samples (text, doc id, URL) to TensorBoard and samples.jsonl
    every N steps (and step 1)."""
    top_k: int = 3
    """Samples per table (0: none)."""
    max_weight_window: int = 1000
    """Steps in the windowed distribution of the per-step max weight (weights/max_window)."""
    loss_chunks: int = 8
    """Chunks of the output projection in the per-sample loss (memory vs launch overhead)."""
    metrics_file: str = "metrics.jsonl"
    """File under dump_folder that receives one JSON object per step (rank 0)."""

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown reweighting strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.cap is not None and not self.cap >= 1:
            raise ValueError(f"reweight.cap must be >= 1 (or unset), got {self.cap}")
        for name in ("log_interval", "loss_chunks", "histogram_interval", "samples_interval", "max_weight_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"reweight.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k < 0:
            raise ValueError(f"reweight.top_k must be >= 0, got {self.top_k}")
        self.schedule()  # validates temperatures / anneal

    def schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule(
            target=self.temperature,
            warmup_value=self.warmup_temperature,
            warmup_steps=self.warmup_steps,
            anneal=self.anneal,
            anneal_steps=self.anneal_steps,
        )


@dataclass(kw_only=True, slots=True)
class FaultConfig:
    """`[fault]`: what the trainer does about non-finite values and signals (docs/resuming.md).

    The keys marked TESTING are fault-injection knobs for the tests; they run the real code paths
    (a real non-finite activation inside the model, a real NaN gradient, a real signal or SIGKILL)
    and are off by default."""

    max_consecutive_skips: int = 10
    """Stop the run (after a checkpoint) when this many optimizer steps in a row were skipped for a
    non-finite gradient norm or a non-finite per-sample loss; 0: never stop."""
    signal_check_interval: int = 1
    """Steps between the ranks' agreement on a received SIGTERM/SIGUSR1: one all-reduce of an int on
    the default process group (on GPU also a device sync, hence 10 in the GPU configs)."""
    signal_exit_code: int = -1
    """Exit code after the checkpoint that a SIGTERM/SIGUSR1 asked for: -1 = 128 + signal number
    (143 for TERM, 138 for USR1), the shell's convention for "stopped by a signal", which Slurm's
    RequeueExit can match; 0 makes it look like a finished run."""
    audit_rows: bool = False
    """Every rank appends the rows it was served, per step, to <dump_folder>/audit/rank<N>.jsonl
    (dataset, epoch, row per sample): proof that a resumed run neither repeats nor skips data."""
    nan_loss_steps: list[int] = field(default_factory=list)
    """TESTING: at these steps, sample 0 of the first micro-batch on DP rank `rank` gets +inf as its
    token-embedding output: a real non-finite activation through every layer (its loss is NaN)."""
    nan_grad_steps: list[int] = field(default_factory=list)
    """TESTING: at these steps, one gradient element on DP rank `rank` becomes NaN after backward."""
    rank: int = 0
    """TESTING: the DP rank the nan_* knobs act on."""
    kill_at_step: int = 0
    """TESTING: SIGKILL this process after this step (and its checkpoint, if one is due), in the first
    attempt only (TORCHELASTIC_RESTART_COUNT unset or 0); 0: off."""
    kill_rank: int = -1
    """TESTING: the global rank kill_at_step / signal_at_step act on; -1: every rank."""
    signal_at_step: int = 0
    """TESTING: send SIGUSR1 to this process during this step (first attempt only); 0: off."""

    def validate(self) -> None:
        if self.max_consecutive_skips < 0:
            raise ValueError(f"fault.max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")
        if self.signal_check_interval < 1:
            raise ValueError(f"fault.signal_check_interval must be >= 1, got {self.signal_check_interval}")
        if not -1 <= self.signal_exit_code <= 255:
            raise ValueError(f"fault.signal_exit_code must be -1 or 0..255, got {self.signal_exit_code}")


@dataclass(kw_only=True, slots=True)
class PeriodicEvalConfig:
    """`[periodic_eval]`: lm-eval tasks on the model being trained, every `interval` steps (off: 0).

    Every rank runs the same requests (FSDP gathers the weights in the forward); rank 0 logs the
    scores as `eval/<task>/<metric>` in metrics.jsonl and TensorBoard. Offline: the default task is
    one of the two shipped with titan_rw (titan_rw/eval/tasks), so nothing is downloaded."""

    interval: int = 0
    """Steps between evaluations; 0: never."""
    tasks: list[str] = field(default_factory=lambda: ["titan_rw_local_ppl"])
    """lm-eval task names or titan_rw presets (local, paper, ...)."""
    limit: int = 16
    """Examples per task (0: all)."""
    batch_size: int = 8

    def validate(self) -> None:
        for key, low, what in (("interval", 0, "0: never"), ("limit", 0, "0: all examples"), ("batch_size", 1, "")):
            v = getattr(self, key)
            if v < low:
                raise ValueError(f"periodic_eval.{key} = {v} is not allowed: it must be >= {low}" + (f" ({what})" if what else ""))
        if self.interval and not self.tasks:
            raise ValueError("periodic_eval.tasks is empty while periodic_eval.interval > 0")


class TrainingStopped(Exception):
    """The run stopped early on purpose, after saving a checkpoint (a signal, too many skipped
    steps). `exit_code` is what `python -m titan_rw.train` exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Exit code when max_consecutive_skips stops the run.
EXIT_TOO_MANY_SKIPS = 3
# A signal repeated within this many seconds is the same request: Slurm's scancel / requeue /
# pre-emption signals every process of the job step, and torchrun forwards the same signal to its
# workers, so a rank gets it twice at once. Repeated later, it means "stop now".
SAME_SIGNAL_WINDOW_S = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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


def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")


class ReweightTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        reweight: ReweightConfig = field(default_factory=ReweightConfig)
        fault: FaultConfig = field(default_factory=FaultConfig)
        periodic_eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
        portable_init: bool = True
        """Initialize the weights on rank 0 as one full model (seed `debug.seed`) and broadcast
        them, so that the initial weights do not depend on the world size or the sharding
        (DTensor's sharded RNG does). Rank 0 holds one full fp32 copy on CPU for a moment."""
        run_values: dict = field(default_factory=dict)
        """The resolved run config {section: {key: value}} (titan_rw.config), saved by rank 0 to
        <dump_folder>/config.json and run_config.toml."""

    def __init__(self, config: Config):
        compat.log_applied(logger)
        config.reweight.validate()
        config.fault.validate()
        config.periodic_eval.validate()
        _check_parallelism(config.parallelism)
        _no_cuda_graph_capture(config.training)
        super().__init__(config)
        rw = config.reweight
        self.rw = rw
        self.temperature_schedule = rw.schedule()

        model = self.model_parts[0]
        if config.portable_init and not config.checkpoint.create_seed_checkpoint:
            self._portable_init(model)
        model._skip_lm_head = True  # the per-sample loss applies the output projection itself
        self.lm_head = model.lm_head

        if self.parallel_dims.dp_enabled:
            mesh = self.parallel_dims.get_mesh("batch")
            self.dp_group, self.dp_rank, self.dp_size = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        else:
            self.dp_group, self.dp_rank, self.dp_size = None, 0, 1
        self.group_b = config.training.local_batch_size * self.dp_size
        self.tokens_per_step = (
            self.gradient_accumulation_steps * self.group_b * config.training.seq_len
        )

        self._weighted = reweighted_loss
        if config.compile.enable and "loss" in config.compile.components:
            # gather → weights → weighted loss: one compiled region
            self._weighted = torch.compile(reweighted_loss, backend=config.compile.backend)

        self._groups: list[Any] = []  # WeightStats of the current step's groups
        self._temperature_value: float | None = None  # host copy of self._temperature_t
        self._is_rank0 = (not torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
        if self._is_rank0:
            os.makedirs(config.dump_folder, exist_ok=True)
        mp = self.metrics_processor
        self.run_logger = RunLogger.Config(
            enable_tensorboard=config.metrics.enable_tensorboard,
            metrics_file=rw.metrics_file,
            log_interval=rw.log_interval,
            histogram_interval=rw.histogram_interval,
            samples_interval=rw.samples_interval,
            top_k=rw.top_k,
            max_weight_window=rw.max_weight_window,
        ).build(
            config.dump_folder,
            rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
            writer=tb_writer_of(mp),
            static={"strategy": rw.strategy},
            total_steps=config.training.steps,
            num_flops_per_token=mp.num_flops_per_token,
            peak_flops=getattr(mp, "gpu_peak_flops", None) if self.device.type == "cuda" else None,  # no MFU on CPU
            decode=getattr(self.tokenizer, "decode", None),
        )
        self.metrics_path = self.run_logger.metrics_path
        self.progress = Progress(config.training.steps)
        # provenance of rank 0's rows (only rank 0 writes metrics / samples)
        self._want_provenance = self._is_rank0 and hasattr(self.dataloader, "last_provenance")
        self._init_faults(config)
        if hasattr(self.checkpointer, "before_save"):  # ResumableCheckpointManager: docs/resuming.md
            self.checkpointer.run_values = config.run_values  # checked against the checkpoint's on resume
            self.checkpointer.before_save = self._flush_before_checkpoint
        from titan_rw.models import FLAVORS, describe

        if config.model_spec is not None and config.model_spec.flavor in FLAVORS:
            logger.info(describe(config.model_spec.flavor))
        logger.info(
            f"titan_rw reweighting: strategy={rw.strategy} r={rw.temperature} "
            f"(warm-up r={rw.warmup_temperature} for {rw.warmup_steps} steps, {rw.anneal}) cap={rw.cap} "
            f"scope={rw.scope} b={self.group_b if rw.scope == 'microbatch' else self.group_b * self.gradient_accumulation_steps} "
            f"dp={self.dp_size} accumulation={self.gradient_accumulation_steps}"
        )

    def init_distributed(self):
        """TorchTitan's, except in a torchrun restart (attempt > 0): the process group then
        rendezvous under a per-attempt key prefix. torchrun (torch 2.13) keeps one agent store
        across attempts, so without it a restarted rank can read the previous attempt's addresses
        and fail ("Gloo connectFullMesh failed ... Connection refused"; seen in ~1/3 of restarts)."""
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt in ("", "0") or torch.distributed.is_initialized() or "MASTER_ADDR" not in os.environ:
            return super().init_distributed()
        import functools

        from torch.distributed import PrefixStore, TCPStore

        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        timeout = timedelta(seconds=self.config.comm.init_timeout_seconds)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            base = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                            is_master=False, timeout=timeout)
        else:
            base = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                            is_master=rank == 0, timeout=timeout, multi_tenant=True)
        store = PrefixStore(f"titan_rw/attempt_{attempt}/", base)
        original = torch.distributed.init_process_group
        torch.distributed.init_process_group = functools.partial(original, store=store, rank=rank, world_size=world)
        try:
            return super().init_distributed()
        finally:
            torch.distributed.init_process_group = original

    @torch.no_grad()
    def _portable_init(self, model: torch.nn.Module) -> None:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, distribute_tensor

        on = dist.is_initialized() and dist.get_world_size() > 1
        rank0 = not on or dist.get_rank() == 0
        sd: dict[str, torch.Tensor] = {}
        if rank0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.debug.seed or 0)
                with torch.device("cpu"):
                    plain = self.model_config.build()
                plain.init_weights(buffer_device=None)
            sd = dict(plain.named_parameters())
        for name, p in model.named_parameters():
            # activation checkpointing and per-block compile wrap modules and rename their parameters
            plain_name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            full = sd[plain_name].detach() if rank0 else None
            if isinstance(p, DTensor):
                if full is None:
                    full = torch.empty(p.shape, dtype=p.dtype)
                local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=0)
                p.to_local().copy_(local.to_local())
            else:
                if full is None:
                    full = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                full = full.to(p.device, p.dtype)
                if on:
                    dist.broadcast(full, src=0)
                p.copy_(full)

    # ------------------------------------------------------------------ the step's body
    def _per_sample(self, inputs, labels, extra_kwargs, mb_index: int = 0):
        self._inject_row = self._inject_nan_loss and mb_index == 0  # read by _embedding_fault_hook
        hidden = self.model_parts[0](inputs, **extra_kwargs)
        losses, n_valid = per_sample_loss(self.lm_head, hidden, labels, num_chunks=self.rw.loss_chunks)
        return losses, n_valid

    def _forward_backward_body(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
        extra_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        k = self.gradient_accumulation_steps
        with self.train_context():
            losses, n_valid = self._per_sample(inputs, labels, extra_kwargs, self._fb_calls)
            self._fb_calls += 1
            valid = n_valid > 0
            if self._fixed_weights is None:  # microbatch scope: this micro-batch is the group
                loss, stats = self._weighted(
                    losses,
                    self._temperature_t,
                    strategy=self.rw.strategy,
                    cap=self.rw.cap,
                    group=self.dp_group,
                    dp_rank=self.dp_rank,
                    dp_size=self.dp_size,
                    valid=valid,
                )
                self._groups.append(stats)
                loss = loss / k
            else:  # global_batch scope: weights fixed by the pre-pass
                w = self._fixed_weights[self._mb_index]
                loss = torch.where(w > 0, w * losses.float(), 0.0).sum()
                self._mb_index += 1
            with spmd.no_typecheck():
                loss.backward()
        return loss.detach()

    @torch.no_grad()
    def _global_batch_weights(self, microbatches) -> None:
        """Pre-pass for scope=global_batch: weights over all k micro-batches of the step."""
        local = []
        for j, (input_dict, labels) in enumerate(microbatches):
            inputs, labels, extra_kwargs = self.post_dataloading_process(input_dict, labels)
            with self.train_context():
                losses, n_valid = self._per_sample(inputs, labels, extra_kwargs, j)
            local.append(torch.stack([losses.float(), (n_valid > 0).float()]))  # [2, b_local]
        self.ntokens_seen -= sum(lbl.numel() for _, lbl in microbatches)  # counted again in the grad pass
        k, b_l, dp = len(local), local[0].shape[1], self.dp_size
        mine = torch.stack(local)  # [k, 2, b_local]
        ok_local = torch.isfinite(mine[:, 0]) & (mine[:, 1] > 0.5)
        mine = torch.stack([mine[:, 0], ok_local.float()], dim=1)
        everyone = gather_losses(mine.reshape(-1), self.dp_group).view(dp, k, 2, b_l)
        # global order: micro-batch j, then DP rank, then row  (what a 1-rank run would see)
        everyone = everyone.permute(1, 0, 3, 2).reshape(k * dp * b_l, 2)
        f, ok = everyone[:, 0], everyone[:, 1] > 0.5
        w = sample_weights(f, self.rw.strategy, self._temperature_t, cap=self.rw.cap, valid=ok)
        self._fixed_weights = list(w.view(k, dp, b_l)[:, self.dp_rank])
        self._mb_index = 0
        self._groups.append(WeightStats.of(f, w, ok))

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
        temperature = self.temperature_schedule(self.step)
        self._set_temperature(temperature)
        self._groups = []
        self._fixed_weights = None
        self._fb_calls = 0
        f = self.fault
        self._inject_nan_loss = self.step in f.nan_loss_steps and self.dp_rank == f.rank
        if f.signal_at_step == self.step and self._fault_rank_matches() and _first_attempt():
            os.kill(os.getpid(), signal.SIGUSR1)  # TESTING knob: a real signal, mid-step

        microbatches = []
        audit = [] if self._audit_fh is not None else None
        provenance: list | None = [] if self._want_provenance else None
        local_valid_tokens = torch.tensor(0, dtype=torch.int64)
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(data_iterator)
            if provenance is not None or audit is not None:  # rows of the batch just served (host lists)
                prov = self.dataloader.last_provenance
                if provenance is not None:
                    provenance.extend(prov)
                if audit is not None:
                    audit.extend([[p[0].get("dataset"), p[0].get("epoch"), p[0].get("row")] if p else None for p in prov])
            local_valid_tokens += (labels != IGNORE_INDEX).sum()
            input_dict = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in input_dict.items()}
            microbatches.append((input_dict, labels.to(self.device)))
        global_valid_tokens = local_valid_tokens.to(self.device)  # unused by the reweighted body
        sample_inputs = None
        if provenance is not None and self.run_logger.config.top_k > 0 and (
            self.step == 1 or self.step % self.rw.samples_interval == 0
        ):
            sample_inputs = torch.cat([mb[0]["input"] for mb in microbatches])

        if self.rw.scope == "global_batch" and self.gradient_accumulation_steps > 1:
            self._global_batch_weights(microbatches)

        for input_dict, labels in microbatches:
            self.forward_backward_step(input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)
        del microbatches
        if audit is not None:
            self._audit_fh.write(json.dumps({"step": self.step, "dp_rank": self.dp_rank, "rows": audit}) + "\n")
            self._audit_fh.flush()
        if self.step in f.nan_grad_steps and self.dp_rank == f.rank:
            self._inject_nan_grad()

        params = [p for m in self.model_parts for p in m.parameters()]
        grad_norm = dist_utils.clip_grad_norm_(
            params,
            self.config.training.max_norm,
            foreach=True,
            pp_mesh=None,
            ep_enabled=self.parallel_dims.ep_enabled,
        )
        self.checkpointer.maybe_wait_for_staging()
        self._nonfinite_now = self._count_nonfinite()
        self._optimizer_step(grad_norm, self._nonfinite_now)
        self.lr_schedulers.step()

        self._record(grad_norm, lr, temperature, provenance, sample_inputs, self._periodic_eval())

    def _periodic_eval(self) -> dict[str, float]:
        """`[periodic_eval]`: lm-eval scores of the current model (host floats), or {}."""
        pe = self.config.periodic_eval
        if not pe.interval or self.step % pe.interval != 0:
            return {}
        from titan_rw.eval.periodic import evaluate_model

        scores = evaluate_model(self.model_parts[0], self.tokenizer, list(pe.tasks), pe.limit or None,
                                max_length=self.config.training.seq_len, batch_size=pe.batch_size)
        if self._is_rank0:
            logger.info(f"step {self.step} eval: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))
        return scores

    # ------------------------------------------------------------------ statistics
    def _provenance_index(self, n_rows: int) -> list[int] | None:
        """Position of each of this rank's rows in the step's groups concatenated (RunLogger's
        `provenance_index`): micro-batch j, row r -> j*b + r + dp_rank*b_local, b = the group's size."""
        k, b_l = self.gradient_accumulation_steps, self.config.training.local_batch_size
        if k == 1 and self.dp_rank == 0:
            return None
        b = self.group_b  # both scopes: micro-batch j's rows sit at [j*b, (j+1)*b), DP rank order
        return [j * b + self.dp_rank * b_l + r for j in range(k) for r in range(b_l)][:n_rows]

    def _record(self, grad_norm, lr, temperature, provenance, sample_inputs, scores=None) -> None:
        """Hand the step to the RunLogger (device ops only; no host sync)."""
        g = self._groups
        self.last_weight_stats = g  # for observability hooks and tests (device tensors)
        extra: dict[str, Any] = {"lr": lr, "grad_norm": grad_norm.detach()}
        extra.update(self._fault_metrics())
        extra.update(scores or {})  # eval/<task>/<metric>: host floats, on eval steps only
        self.run_logger.record(
            self.step,
            g,
            temperature=temperature,
            provenance=provenance,
            provenance_index=self._provenance_index(len(provenance)) if provenance is not None else None,
            inputs=sample_inputs,
            ntokens=self.tokens_per_step // self.dp_size,
            extra=extra,
        )
        if self._is_flush_step():
            self._flush()

    def _count_nonfinite(self) -> torch.Tensor:
        """Samples of the step's groups (gathered over DP: every rank counts the same) whose loss
        is NaN/inf, as a device int."""
        return sum(((~torch.isfinite(s.losses)).sum() for s in self._groups),
                   torch.zeros((), dtype=torch.int64, device=self.device))

    def _flush_before_checkpoint(self, step: int) -> None:
        """Before a checkpoint is written: the rows of every step it covers go to metrics.jsonl
        (fsync'ed), so a hard kill after the save loses none of them."""
        if self.run_logger is not None:
            self._flush()
            self.run_logger.sync()

    def _fault_metrics(self) -> dict[str, Any]:
        """Per-step fault counters (device tensors) merged into the metrics row."""
        return {
            "nonfinite_samples": self._nonfinite_now,  # NaN/inf losses in the step: weight 0, step dropped
            "skipped": self._skipped_now,  # 1 when this step's optimizer update was skipped
            "skipped_steps": self._skipped_total,  # since the start of the run (checkpointed)
            "consecutive_skips": self._consec,
        }

    def _is_flush_step(self) -> bool:
        n = self.rw.log_interval
        return self.step == 1 or self.step % n == 0 or self.step >= self.config.training.steps

    def _flush(self) -> list[dict]:
        rows = self.run_logger.flush(self.step)  # the one device->host read of the interval
        for r in rows:
            if r.get("skipped", 0) > 0:
                why = (f"{int(r['nonfinite_samples'])} sample(s) with a non-finite loss"
                       if r.get("nonfinite_samples", 0) > 0 else f"non-finite gradient norm ({r.get('grad_norm')})")
                logger.warning(
                    f"step {r['step']}: {why}; optimizer step skipped "
                    f"({int(r.get('consecutive_skips', 0))} in a row, {int(r.get('skipped_steps', 0))} in the run)"
                )
        if rows and self._is_rank0:
            logger.info(self.progress.row_line(rows[-1]))
        return rows

    # ------------------------------------------------------------------ faults
    def _init_faults(self, config) -> None:
        f = self.fault = config.fault
        self._inject_nan_loss = self._inject_row = False
        self._nonfinite_now = torch.zeros((), dtype=torch.int64, device=self.device)
        if f.nan_loss_steps:  # TESTING knob: the hook exists only when the knob is set
            self.model_parts[0].tok_embeddings.register_forward_hook(self._embedding_fault_hook)
        self._fb_calls = 0
        z = lambda: torch.zeros((), dtype=torch.int64, device=self.device)  # noqa: E731
        self._skipped_now, self._skipped_total, self._consec, self._max_consec = z(), z(), z(), z()
        # fused AdamW/Adam skip on device (found_inf): no host sync; else one host read per step
        self._fused_skip = all(
            any(g.get("fused") for g in o.param_groups) and type(o).__name__ in ("Adam", "AdamW")
            for o in self.optimizers.optimizers
        )
        self._stop_reason: tuple[str, int] | None = None
        self._signal_received = 0
        self._signal_time = 0.0
        self._prev_handlers: dict[int, Any] = {}
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._prev_handlers[sig] = signal.signal(sig, self._on_signal)
        self._world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self._rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # The signal agreement and the RunLogger-state broadcast use the default group: a new gloo
        # group would be cheaper on GPU, but after a torchrun restart its rendezvous can read the
        # previous attempt's addresses from the store and fail (seen with torch 2.13).
        self._multi = self._world > 1
        self._audit_fh = None
        if f.audit_rows and hasattr(self.dataloader, "last_provenance"):
            d = os.path.join(config.dump_folder, "audit")
            os.makedirs(d, exist_ok=True)
            self._audit_fh = open(os.path.join(d, f"rank{self._rank}.jsonl"), "a")
        if not self._fused_skip:
            logger.info("titan_rw: optimizer is not fused Adam/AdamW: a non-finite gradient norm is checked on the host every step")

    def _fault_rank_matches(self) -> bool:
        return self.fault.kill_rank in (-1, self._rank)

    def _on_signal(self, signum, _frame) -> None:
        if self._signal_received == signum:
            if time.monotonic() - self._signal_time < SAME_SIGNAL_WINDOW_S:
                return  # one stop request delivered twice: by Slurm to every process of the step and by torchrun
            signal.signal(signum, signal.SIG_DFL)  # asked again later: stop now, without a checkpoint
            os.kill(os.getpid(), signum)
            return
        self._signal_received = signum
        self._signal_time = time.monotonic()
        sys.stderr.write(f"[titan_rw] rank {self._rank}: received {signal.Signals(signum).name}; "
                         "will checkpoint and exit after the current step\n")

    def _embedding_fault_hook(self, _module, _args, out):
        """TESTING (fault.nan_loss_steps): +inf in sample 0's token embeddings, so the non-finite
        value starts inside the model and flows through every layer, as a real overflow would."""
        if not self._inject_row:
            return None
        first = (torch.arange(out.shape[0], device=out.device) == 0).view(-1, *([1] * (out.dim() - 1)))
        return torch.where(first, torch.full_like(out, float("inf")), out)

    @torch.no_grad()
    def _inject_nan_grad(self) -> None:
        from torch.distributed.tensor import DTensor

        for p in (p for m in self.model_parts for p in m.parameters()):
            g = p.grad
            if g is None:
                continue
            loc = g.to_local() if isinstance(g, DTensor) else g
            if loc.numel():
                loc.view(-1)[0] = float("nan")
                return

    def _optimizer_step(self, grad_norm: torch.Tensor, nonfinite_samples: torch.Tensor) -> None:
        """The optimizer step, skipped when the gradient norm is not finite or any sample of the
        step has a non-finite loss (docs/resuming.md, "Non-finite values": a non-finite activation
        reaches every weight gradient through its row, x·g with x = NaN, so the step is dropped
        rather than trusted). The LR and temperature schedules still advance: the step's data is
        consumed; parameters and optimizer moments and step counts are untouched."""
        ok = torch.isfinite(grad_norm.detach().float().reshape(())) & (nonfinite_samples == 0)
        bad = (~ok).to(torch.int64)
        if self._fused_skip:
            found_inf = bad.float()
            for o in self.optimizers.optimizers:
                o.found_inf = found_inf  # torch's fused Adam(W) kernel skips the update on device
            try:
                self.optimizers.step()
            finally:
                for o in self.optimizers.optimizers:
                    o.found_inf = None
        elif bool(ok):  # host read: one per step (only for non-fused optimizers)
            self.optimizers.step()
        self._skipped_now = bad
        self._skipped_total = self._skipped_total + bad
        self._consec = (self._consec + 1) * bad
        self._max_consec = torch.maximum(self._max_consec, self._consec)

    def _check_skips(self) -> None:
        """At flush steps (every rank; identical values since the gradient norm is global):
        too many consecutive skips -> stop after a checkpoint."""
        n = self.fault.max_consecutive_skips
        if n <= 0 or not self._is_flush_step():
            return
        worst = int(self._max_consec)  # host read on flush steps only
        self._max_consec = self._consec.clone()
        if worst >= n:
            self._stop_reason = (
                f"{worst} consecutive optimizer steps skipped for a non-finite gradient norm or loss "
                f"(fault.max_consecutive_skips = {n}); the model is that of the last good step",
                EXIT_TOO_MANY_SKIPS,
            )

    def _agree_signal(self) -> int:
        """Every signal_check_interval steps: the largest signal number any rank received (0: none)."""
        if self.step % self.fault.signal_check_interval != 0 and self.step < self.config.training.steps:
            return 0
        if not self._multi:
            return int(self._signal_received)
        flag = torch.tensor([int(self._signal_received)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())  # on GPU: a device sync every signal_check_interval steps

    def _after_step(self) -> None:
        f = self.fault
        if f.kill_at_step == self.step and self._fault_rank_matches() and _first_attempt():
            logger.warning(f"TESTING fault.kill_at_step: SIGKILL of rank {self._rank} after step {self.step}")
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._check_skips()
        sig = self._agree_signal()
        if sig and self._stop_reason is None:
            code = 128 + sig if f.signal_exit_code == -1 else f.signal_exit_code
            self._stop_reason = (f"{signal.Signals(sig).name} received", code)
        if self._stop_reason is None:
            return
        msg, code = self._stop_reason
        saved = self.checkpointer.save_now(self.step)
        where = (os.path.join(self.checkpointer.folder, f"step-{self.step}") if saved
                 else "no checkpoint (checkpoint.enable is false)")
        full = f"titan_rw: stopping at step {self.step}: {msg}; saved {where}; exit code {code}"
        logger.error(full) if code == EXIT_TOO_MANY_SKIPS else logger.warning(full)
        raise TrainingStopped(full, code)

    # ------------------------------------------------------------------ the loop
    @record
    def train(self):
        """TorchTitan's loop, plus: resume from the newest complete checkpoint (logged), the fault
        checks after each step (SIGTERM/SIGUSR1, too many skipped steps) and the testing knobs."""
        config = self.config
        sl.log_trace_instant("training_start")
        self.checkpointer.load(step=config.checkpoint.load_step)
        if self._is_rank0:  # after the resume check: a refused config never replaces the run's
            self._save_run_config()
        loaded_step = self.step
        if loaded_step:
            logger.info(f"titan_rw: resumed from the checkpoint of step {loaded_step} "
                        f"(data cursor, optimizer, LR and temperature schedules, RNG restored)")
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
                    self._after_step()
        self.checkpointer.maybe_wait_for_saving()
        logger.info("Training completed")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """TorchTitan's train state (step, ntokens_seen) + ours, pickled into one bytes value (DCP
        stores it once; any world size loads it): the temperature schedule, the RunLogger (rank 0's),
        the skip counters and the RNG states (rank 0's: TorchTitan seeds every DP rank alike)."""
        sd = Trainer.state_dict(self)
        if not hasattr(self, "_skipped_total"):
            return sd
        rl = self.run_logger.state_dict() if getattr(self, "run_logger", None) is not None else {}
        if self._multi:  # only rank 0's RunLogger is enabled
            box = [rl]
            torch.distributed.broadcast_object_list(box, src=0)
            rl = box[0]
        extra = {
            "version": 1,
            "temperature_last_step": self.temperature_schedule.last_step,
            "run_logger": rl,
            "skipped_steps": int(self._skipped_total),
            "consecutive_skips": int(self._consec),
            "rng": _rng_state(),
            "run_values": self.config.run_values,  # the resume check (titan_rw.checkpointing)
        }
        sd["titan_rw"] = pickle.dumps(extra)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        Trainer.load_state_dict(self, state_dict)
        raw = state_dict.get("titan_rw")
        if raw is not None and hasattr(self, "_skipped_total"):
            extra = pickle.loads(raw) if isinstance(raw, (bytes, bytearray)) else raw
            self.temperature_schedule.last_step = int(extra["temperature_last_step"])
            if getattr(self, "run_logger", None) is not None:
                self.run_logger.load_state_dict(extra["run_logger"])
            self._skipped_total.fill_(int(extra["skipped_steps"]))
            self._consec.fill_(int(extra["consecutive_skips"]))
            self._max_consec.fill_(int(extra["consecutive_skips"]))
            _set_rng_state(extra["rng"])
        if hasattr(self, "progress"):
            self.progress = Progress(self.config.training.steps, start=self.step)

    def close(self) -> None:
        if getattr(self, "run_logger", None) is not None:
            try:
                self.run_logger.close()  # flushes what is pending
            except Exception as e:  # noqa: BLE001  closing must not mask the original error
                logger.warning(f"titan_rw: could not flush the last metrics: {e}")
            self.run_logger = None
        if getattr(self, "_audit_fh", None) is not None:
            self._audit_fh.close()
            self._audit_fh = None
        for sig, h in getattr(self, "_prev_handlers", {}).items():
            signal.signal(sig, h)
        self._prev_handlers = {}
        super().close()

    # ------------------------------------------------------------------ run config
    def _save_run_config(self) -> None:
        """`<dump_folder>/config.json` (every section, defaults included, resolved paths) and
        `<dump_folder>/run_config.toml` (the same as TOML: `--config` re-runs it). Rank 0."""
        values = self.config.run_values
        if not values:
            return
        from titan_rw.config import to_toml

        with open(os.path.join(self.config.dump_folder, "config.json"), "w") as fh:
            json.dump(values, fh, indent=1, default=str)
        try:
            toml = to_toml(values)
        except TypeError as e:  # a value TOML cannot hold: the JSON still has it
            logger.warning(f"titan_rw: run_config.toml not written: {e}")
        else:
            with open(os.path.join(self.config.dump_folder, "run_config.toml"), "w") as fh:
                fh.write(toml)


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])

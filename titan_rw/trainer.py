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
3. statistics stay on device; they are read to the host once per `log_interval` steps, when
   the buffered rows are written to `<dump_folder>/metrics.jsonl` (rank 0) and TensorBoard.

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
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import spmd_types as spmd
import torch
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from titan_rw import compat
from titan_rw.loss import IGNORE_INDEX, gather_losses, per_sample_loss, reweighted_loss
from titan_rw.reweight import STRATEGIES, TemperatureSchedule, sample_weights


@dataclass(kw_only=True, slots=True)
class ReweightConfig:
    strategy: str = "linupper"
    """One of uniform, linupper, quadratic, extremes, dro_kl (DESIGN.md §2)."""
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
    loss_chunks: int = 8
    """Chunks of the output projection in the per-sample loss (memory vs launch overhead)."""
    metrics_file: str = "metrics.jsonl"
    """File under dump_folder that receives one JSON object per step (rank 0)."""

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown reweighting strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.cap is not None and not self.cap >= 1:
            raise ValueError(f"reweight.cap must be >= 1 (or unset), got {self.cap}")
        if self.log_interval < 1 or self.loss_chunks < 1:
            raise ValueError("reweight.log_interval and reweight.loss_chunks must be >= 1")
        self.schedule()  # validates temperatures / anneal

    def schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule(
            target=self.temperature,
            warmup_value=self.warmup_temperature,
            warmup_steps=self.warmup_steps,
            anneal=self.anneal,
            anneal_steps=self.anneal_steps,
        )


# Column order of the per-step on-device stats vector.
_COLS = ("loss", "weighted_loss", "max_weight", "b", "bound_ratio", "ess", "weight_entropy", "grad_norm")


class ReweightTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        reweight: ReweightConfig = field(default_factory=ReweightConfig)
        portable_init: bool = True
        """Initialize the weights on rank 0 as one full model (seed `debug.seed`) and broadcast
        them, so that the initial weights do not depend on the world size or the sharding
        (DTensor's sharded RNG does). Rank 0 holds one full fp32 copy on CPU for a moment."""

    def __init__(self, config: Config):
        compat.log_applied(logger)
        config.reweight.validate()
        if config.parallelism.pipeline_parallel_degree > 1:
            raise ValueError("titan_rw: pipeline parallelism is not supported by the reweighted step")
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
        self._rows: list[torch.Tensor] = []  # per-step device stats, flushed at the interval
        self._row_meta: list[tuple[int, float, float]] = []  # (step, lr, temperature): host values
        self._last_flush = (time.perf_counter(), 0)  # (time, step)
        self._is_rank0 = (not torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
        self.metrics_path = os.path.join(config.dump_folder, rw.metrics_file)
        self._metrics_fh = None
        if self._is_rank0:
            os.makedirs(config.dump_folder, exist_ok=True)
        from titan_rw.models import FLAVORS, describe

        if config.model_spec is not None and config.model_spec.flavor in FLAVORS:
            logger.info(describe(config.model_spec.flavor))
        logger.info(
            f"titan_rw reweighting: strategy={rw.strategy} r={rw.temperature} "
            f"(warm-up r={rw.warmup_temperature} for {rw.warmup_steps} steps, {rw.anneal}) cap={rw.cap} "
            f"scope={rw.scope} b={self.group_b if rw.scope == 'microbatch' else self.group_b * self.gradient_accumulation_steps} "
            f"dp={self.dp_size} accumulation={self.gradient_accumulation_steps}"
        )

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
            full = sd[name].detach() if rank0 else None
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
    def _per_sample(self, inputs, labels, extra_kwargs):
        hidden = self.model_parts[0](inputs, **extra_kwargs)
        return per_sample_loss(self.lm_head, hidden, labels, num_chunks=self.rw.loss_chunks)

    def _forward_backward_body(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor,
        extra_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        k = self.gradient_accumulation_steps
        with self.train_context():
            losses, n_valid = self._per_sample(inputs, labels, extra_kwargs)
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
        for input_dict, labels in microbatches:
            inputs, labels, extra_kwargs = self.post_dataloading_process(input_dict, labels)
            with self.train_context():
                losses, n_valid = self._per_sample(inputs, labels, extra_kwargs)
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
        b = ok.sum()
        clean = torch.where(ok, f, 0.0)
        from titan_rw.loss import WeightStats

        self._groups.append(
            WeightStats(
                losses=f, weights=w, valid=ok, b=b, max_weight=w.max(),
                weighted_loss=(w * clean).sum(), mean_loss=clean.sum() / b.clamp(min=1),
            )
        )

    # ------------------------------------------------------------------ the optimizer step
    def train_step(self, data_iterator: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]):
        self.optimizers.zero_grad(set_to_none=True)
        lr = next(iter(self.lr_schedulers.get_metrics().values()), float("nan"))
        temperature = self.temperature_schedule(self.step)
        self._temperature_t = torch.tensor(temperature, dtype=torch.float32, device=self.device)
        self._groups = []
        self._fixed_weights = None

        microbatches = []
        local_valid_tokens = torch.tensor(0, dtype=torch.int64)
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(data_iterator)
            local_valid_tokens += (labels != IGNORE_INDEX).sum()
            input_dict = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in input_dict.items()}
            microbatches.append((input_dict, labels.to(self.device)))
        global_valid_tokens = local_valid_tokens.to(self.device)  # unused by the reweighted body

        if self.rw.scope == "global_batch" and self.gradient_accumulation_steps > 1:
            self._global_batch_weights(microbatches)

        for input_dict, labels in microbatches:
            self.forward_backward_step(input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)
        del microbatches

        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.config.training.max_norm,
            foreach=True,
            pp_mesh=None,
            ep_enabled=self.parallel_dims.ep_enabled,
        )
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()

        self._record(grad_norm, lr, temperature)
        if self._should_flush():
            self._flush()

    # ------------------------------------------------------------------ statistics
    def _record(self, grad_norm: torch.Tensor, lr: float, temperature: float) -> None:
        """Reduce this step's group stats to one small device vector (no host sync)."""
        g = self._groups
        mean = lambda xs: torch.stack(xs).float().mean()  # noqa: E731
        max_w = torch.stack([s.max_weight for s in g]).float()
        b = torch.stack([s.b for s in g]).float()
        ess = mean([1.0 / (s.weights.float() ** 2).sum().clamp(min=1e-30) for s in g])
        ent = mean([-(torch.where(s.weights > 0, s.weights * s.weights.clamp(min=1e-30).log(), 0.0)).sum() for s in g])
        row = torch.stack([
            mean([s.mean_loss for s in g]),
            mean([s.weighted_loss for s in g]),
            max_w.max(),
            b.max(),
            (max_w * b / 2).max(),
            ess,
            ent,
            grad_norm.detach().float().reshape(()),
        ])
        self._rows.append(row)
        self._row_meta.append((self.step, lr, temperature))
        self.last_weight_stats = g  # for observability hooks (device tensors)

    def _should_flush(self) -> bool:
        return self.step % self.rw.log_interval == 0 or self.step == 1 or self.step >= self.config.training.steps

    def _flush(self) -> None:
        if not self._rows:
            return
        values = torch.stack(self._rows).tolist()  # the one device→host read of the interval
        now = time.perf_counter()
        t0, s0 = self._last_flush
        steps = max(self.step - s0, 1)
        dt = max(now - t0, 1e-9)
        tokens_per_sec = self.tokens_per_step * steps / dt
        rows = []
        for (step, lr, temperature), v in zip(self._row_meta, values):
            d = dict(zip(_COLS, v))
            d["b"] = int(d["b"])
            rows.append({
                "step": step,
                "loss": d["loss"],
                "weighted_loss": d["weighted_loss"],
                "max_weight": d["max_weight"],
                "max_weight_bound": 2.0 / d["b"] if d["b"] else float("nan"),
                "bound_ratio": d["bound_ratio"],
                "b": d["b"],
                "ess": d["ess"],
                "weight_entropy": d["weight_entropy"],
                "temperature": temperature,
                "lr": lr,
                "grad_norm": d["grad_norm"],
                "tokens_per_sec": tokens_per_sec,
                "strategy": self.rw.strategy,
            })
        self._rows, self._row_meta = [], []
        self._last_flush = (now, self.step)
        last = rows[-1]
        if not math.isfinite(last["loss"]):
            raise RuntimeError(f"Loss is not finite ({last['loss']}) at step {last['step']}. Stopping training.")
        total = self.config.training.steps
        eta = (total - self.step) * dt / steps
        if self._is_rank0:
            logger.info(
                f"step {self.step}/{total}  loss {last['loss']:.4f}  wloss {last['weighted_loss']:.4f}  "
                f"max_w {last['max_weight']:.4g} vs 2/b {last['max_weight_bound']:.4g}  r {last['temperature']:g}  "
                f"gnorm {last['grad_norm']:.3f}  lr {last['lr']:.3g}  tok/s {tokens_per_sec:,.0f}  "
                f"eta {_fmt_secs(eta)}"
            )
        if self._is_rank0:
            if self._metrics_fh is None:
                self._metrics_fh = open(self.metrics_path, "a")
            for r in rows:
                self._metrics_fh.write(json.dumps(r) + "\n")
            self._metrics_fh.flush()
        self._log_tensorboard(rows)

    def _log_tensorboard(self, rows: list[dict]) -> None:
        mp = self.metrics_processor
        for r in rows:
            mp.logger.log(
                {
                    "loss/unweighted": r["loss"],
                    "loss/weighted": r["weighted_loss"],
                    "weights/temperature": r["temperature"],
                    "weights/max": r["max_weight"],
                    "weights/ess": r["ess"],
                    "weights/entropy": r["weight_entropy"],
                    "bound/two_over_b": r["max_weight_bound"],
                    "bound/ratio": r["bound_ratio"],
                    "bound/violation": float(r["bound_ratio"] > 1.0 + 1e-6),
                    "perf/tokens_per_sec": r["tokens_per_sec"],
                    "perf/grad_norm": r["grad_norm"],
                    "perf/lr": r["lr"],
                },
                r["step"],
            )
        mp.ntokens_since_last_log = 0
        mp.data_loading_times.clear()
        mp.time_last_log = time.perf_counter()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = Trainer.state_dict(self)
        sd["temperature_last_step"] = self.temperature_schedule.last_step if hasattr(self, "temperature_schedule") else 0
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        Trainer.load_state_dict(self, state_dict)
        if "temperature_last_step" in state_dict and hasattr(self, "temperature_schedule"):
            self.temperature_schedule.last_step = int(state_dict["temperature_last_step"])
        self._last_flush = (time.perf_counter(), self.step)

    def close(self) -> None:
        try:
            if hasattr(self, "_rows"):
                self._flush()
        except Exception as e:  # noqa: BLE001  closing must not mask the original error
            logger.warning(f"titan_rw: could not flush the last metrics: {e}")
        if getattr(self, "_metrics_fh", None) is not None:
            self._metrics_fh.close()
            self._metrics_fh = None
        super().close()


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"

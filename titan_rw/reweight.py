"""The paper's sample weights: pure functions of tensors (no torch.distributed).

    f  -> h = 2 (f - f_min) / (f_max - f_min) - 1         Alg. 1 line 5 (alpha = 1)
    h  -> s = strategy(h)                                  Section 4.2
    s  -> w = softmax(s / r)                               Eq. (4)
    w  -> min(lambda w, c / b), sum = 1  (optional cap)     Proposition 1 / Eq. (5)

Everything stays on the tensor's device with no host synchronisation and no
Python branching on tensor values, so `torch.compile(fullgraph=True)` traces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes", "dro_kl")
ANNEALS = ("constant", "linear", "cosine")

# The paper's guard (Listing 1): a range below this means "all losses equal".
RANGE_EPS = 1e-6


def max_weight_bound(b: int | torch.Tensor, c: float = 2.0):
    """Theorem 1's precondition: no weight above c/b (c = 2 in the paper)."""
    return c / b


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown reweighting strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}"
        )


def _check_temperature(temperature) -> None:
    if isinstance(temperature, torch.Tensor):
        return  # a device tensor: checked by the schedule that produced it (no host sync here)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def normalize(losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Alg. 1 line 5: map valid losses linearly onto [-1, 1]; 0 where the range is ~0."""
    big = torch.finfo(losses.dtype).max
    f_min = torch.where(valid, losses, big).amin()
    f_max = torch.where(valid, losses, -big).amax()
    # Halves keep f_max - f_min finite for losses near the dtype's max.
    half_span = f_max / 2 - f_min / 2
    flat = half_span <= RANGE_EPS / 2  # also true when no sample is valid (span < 0)
    h = 2.0 * ((losses / 2 - f_min / 2) / torch.where(flat, 1.0, half_span)) - 1.0
    return torch.where(flat | ~valid, 0.0, h)


def strategy_scores(h: torch.Tensor, strategy: str) -> torch.Tensor:
    """Section 4.2 with alpha = 1: the strategic score s_i of a normalized loss h_i."""
    if strategy == "uniform":
        return torch.zeros_like(h)
    if strategy == "linupper":
        return torch.clamp(h + 1.0, max=1.0)  # min(h + 1, 1)
    if strategy == "quadratic":
        return 1.0 - h * h
    if strategy == "extremes":
        return h.abs()
    raise ValueError(f"strategy {strategy!r} has no normalized score")


def cap_weights(log_w: torch.Tensor, cap: float, valid: torch.Tensor) -> torch.Tensor:
    """KL projection onto {w >= 0, sum w = 1, w_i <= cap / b} of the weights exp(log_w).

    The projection has Proposition 1's form w_i = min(lambda w_i, cap / b), lambda >= 1. The
    saturated set is the k largest weights; with them pinned at u = cap / b the rest scale by
    lambda_k = (1 - k u) / (sum of the rest), and the answer is the smallest k whose first
    unsaturated weight stays under u. One sort and a scan, in log space so that weights that
    underflow in linear space still count: exact, branch-free, compilable.
    """
    n = log_w.numel()
    n_valid = valid.sum()
    b = n_valid.clamp(min=1).to(log_w.dtype)
    log_u = math.log(cap) - torch.log(b)
    lws, _ = torch.sort(log_w, descending=True)  # invalid (-inf) last
    k = torch.arange(n, device=log_w.device)
    log_rest = torch.logcumsumexp(lws.flip(0), 0).flip(0)  # log(w_(k) + w_(k+1) + ...)
    pinned_left = 1.0 - k.to(log_w.dtype) * torch.exp(log_u)  # mass left for the unpinned
    log_left = torch.log(pinned_left.clamp(min=torch.finfo(log_w.dtype).tiny))
    # lambda_k w_(k) <= u, written with differences of logs so huge |log w| keep their precision
    fits = (log_left + (lws - log_rest) <= log_u + 1e-6) & (pinned_left > 0) & (k < n_valid)
    # First k that fits; k = b - 1 always does up to rounding (then every weight is u = 1/b).
    first = torch.where(fits.any(), fits.to(torch.int8).argmax(), (n_valid - 1).clamp(min=0)).reshape(1)
    log_wi = log_left.gather(0, first) + (log_w - log_rest.gather(0, first))  # log(lambda w_i)
    w = torch.where(valid, torch.exp(torch.minimum(log_wi, log_u)), 0.0)
    return w / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


def sample_weights(
    losses: torch.Tensor,
    strategy: str,
    temperature: float | torch.Tensor,
    *,
    cap: float | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights for one reweighting group (the gathered batch, in DP-rank order).

    Invalid samples (mask False or non-finite loss) get exactly 0 and don't count in b,
    f_min or f_max. Valid weights sum to 1 (all zero when nothing is valid). Computed in
    float32 whatever the input dtype; returned in float32.
    """
    _check_strategy(strategy)
    _check_temperature(temperature)
    if cap is not None and not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap >= 1):
        raise ValueError(f"cap must be a number >= 1 (max weight = cap / b), got {cap!r}")
    if losses.dim() != 1:
        raise ValueError(f"losses must be 1-D (one loss per sample), got shape {tuple(losses.shape)}")
    if valid is not None and valid.shape != losses.shape:
        raise ValueError(
            f"valid mask shape {tuple(valid.shape)} does not match losses shape {tuple(losses.shape)}"
        )

    f = losses.detach().float()
    if f.numel() == 0:
        return f
    ok = torch.isfinite(f)
    if valid is not None:
        ok = ok & valid.to(device=f.device, dtype=torch.bool)
    f = torch.where(ok, f, 0.0)

    if strategy == "dro_kl":  # Table 12 baseline: softmax of the raw loss
        s = f
    else:
        s = strategy_scores(normalize(f, ok), strategy)

    # Eq. (4), stable: subtract the max valid score before exp.
    z = torch.where(ok, s / temperature, -torch.inf)
    z = z - torch.where(ok, z, -torch.finfo(z.dtype).max).amax()
    if cap is not None:  # Proposition 1: w_i = min(lambda e^{z_i}, cap / b)
        log_w = z - torch.logsumexp(torch.where(ok, z, -torch.inf), 0)
        return cap_weights(torch.where(ok, log_w, -torch.inf), float(cap), ok)
    e = torch.where(ok, torch.exp(z), 0.0)
    return e / e.sum().clamp(min=torch.finfo(e.dtype).tiny)


@dataclass
class TemperatureSchedule:
    """Appendix A.2: r = warmup_value for `warmup_steps`, then the target.

    `anneal="constant"` jumps to the target; `"linear"`/`"cosine"` go from warmup_value to
    target over `anneal_steps` after the warm-up. Steps count from 1 like TorchTitan's.
    Checkpointable: its state is the step it was last asked for.
    """

    target: float = 1.0
    warmup_value: float = 100.0
    warmup_steps: int = 0
    anneal: str = "constant"
    anneal_steps: int = 0

    def __post_init__(self):
        for name in ("target", "warmup_value"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"temperature {name} must be a finite number > 0, got {v!r}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"unknown temperature anneal {self.anneal!r}; valid: {', '.join(ANNEALS)}")
        if self.warmup_steps < 0 or self.anneal_steps < 0:
            raise ValueError("temperature warmup_steps and anneal_steps must be >= 0")
        if self.anneal != "constant" and self.anneal_steps == 0:
            raise ValueError(f"anneal={self.anneal!r} needs anneal_steps > 0")
        self.last_step = 0

    def __call__(self, step: int) -> float:
        self.last_step = step
        t = step - self.warmup_steps  # steps past the warm-up
        if t <= 0:
            return float(self.warmup_value)
        if self.anneal == "constant" or t >= self.anneal_steps:
            return float(self.target)
        frac = t / self.anneal_steps
        if self.anneal == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return float(self.warmup_value + (self.target - self.warmup_value) * frac)

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "target": self.target,
            "warmup_value": self.warmup_value,
            "warmup_steps": self.warmup_steps,
            "anneal": self.anneal,
            "anneal_steps": self.anneal_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        # The configured shape wins (a user may change the target on resume); the step resumes.
        self.last_step = int(state["last_step"])


@dataclass(kw_only=True, slots=True)
class ReweightConfig:
    """`[reweight]`: the weights of Algorithm 1 (docs/design.md §2)."""

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
    """Reweighting group under gradient accumulation (titan_rw.trainer's docstring: the cost)."""
    loss_chunks: int = 8
    """Chunks of the output projection in the per-sample loss (memory vs launch overhead)."""

    def validate(self) -> None:
        _check_strategy(self.strategy)
        if self.cap is not None and not self.cap >= 1:
            raise ValueError(f"reweight.cap must be >= 1 (or unset), got {self.cap}")
        if self.loss_chunks < 1:
            raise ValueError(f"reweight.loss_chunks must be >= 1, got {self.loss_chunks}")
        self.schedule()  # validates temperatures / anneal

    def schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule(
            target=self.temperature,
            warmup_value=self.warmup_temperature,
            warmup_steps=self.warmup_steps,
            anneal=self.anneal,
            anneal_steps=self.anneal_steps,
        )

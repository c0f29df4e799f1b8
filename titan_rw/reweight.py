"""The paper's sample weights: pure functions of tensors (no torch.distributed).

    f  -> h = 2 (f - f_min) / (f_max - f_min) - 1         Alg. 1 line 5 (alpha = 1)
    h  -> s = strategy(h)                                  Section 4.2
    s  -> w = softmax(s / r)                               Eq. (4)
    w  -> min(lambda w, c / b), sum = 1  (optional cap)     Proposition 1 / Eq. (5)

With a prior pi (e.g. each document's token share, titan_rw.documents) the uniform weight of
sample i is pi_i instead of 1/b, and the weights reweight on top of it:

    w_i = pi_i exp(s_i / r) / sum_j pi_j exp(s_j / r),  i.e. softmax of z = s / r + log pi,

so `uniform` gives w = pi. Theorem 1 needs w_i <= 2/b = 2 * (1/b): no sample more than twice its
uniform weight. Its analogue with a prior is the ratio bound w_i / pi_i <= c (c = 2), which the
cap enforces as w_i = min(lambda w_i, c pi_i) (Prop. 1's form; `cap_weights`); `max_weight_ratio`
measures it (the run's logged max_weight_ratio).
With pi = 1/b both reduce to the row formulas above.

Everything stays on the tensor's device with no host synchronisation and no
Python branching on tensor values, so `torch.compile(fullgraph=True)` traces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

STRATEGIES = ("uniform", "linupper", "upper", "quadratic", "extremes", "dro_kl")
ANNEALS = ("constant", "linear", "cosine")
# What the first `warmup_steps` steps do (docs/design.md §2): "temperature" trains them at
# r = warmup_temperature (Appendix A.2, fms-fsdp's warm-up), "uniform" with exactly uniform weights (the
# GPT-2 reference code's burn-in: the plain loss), then the strategy.
WARMUP_MODES = ("temperature", "uniform")

# titan_rw's flat-range rule: when f_max - f_min <= RANGE_EPS every h is 0 (all losses count as
# equal). Not the references' rule: they divide by max(f_max - f_min, 1e-6), which agrees above 1e-6
# and differs for spreads in (0, 1e-6] (docs/design.md §9).
RANGE_EPS = 1e-6


def max_weight_bound(b: int | torch.Tensor, c: float = 2.0):
    """Theorem 1's precondition: no weight above c/b (c = 2 in the paper)."""
    return c / b


def max_weight_ratio(weights: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """max_i w_i / pi_i over the samples with pi_i > 0 (pi: each sample's uniform weight, summing to
    1 over the group; 0 for an empty slot or an invalid sample): how many times its uniform weight
    the most up-weighted sample gets. Its bound is c = 2 (Theorem 1's w_i <= 2/b is the case
    pi = 1/b, where the ratio is b * max w). What the run logs as max_weight_ratio (granularity
    "document", `titan_rw.loss.WeightStats.of_documents`). A device scalar, no host sync."""
    return torch.where(prior > 0, weights / torch.where(prior > 0, prior, 1.0), 0.0).max()


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown reweighting strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}"
        )


def check_temperature(temperature) -> None:
    if isinstance(temperature, torch.Tensor):
        return  # a device tensor: checked by the schedule that produced it (no host sync here)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def normalize(losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Alg. 1 line 5: map valid losses linearly onto [-1, 1]; h = 0 for all when
    f_max - f_min <= RANGE_EPS (titan_rw's flat-range rule, see RANGE_EPS)."""
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
    if strategy == "upper":  # the GPT-2 reference code's linear ramp (not fms-fsdp's "upper" = LinUpper)
        return 0.5 * h + 0.5
    if strategy == "quadratic":
        return 1.0 - h * h
    if strategy == "extremes":
        return h.abs()
    raise ValueError(f"strategy {strategy!r} has no normalized score")


def cap_weights(
    log_w: torch.Tensor, cap: float, valid: torch.Tensor, log_prior: torch.Tensor | None = None
) -> torch.Tensor:
    """KL projection onto {w >= 0, sum w = 1, w_i <= cap / b} of the weights exp(log_w).

    The projection has Proposition 1's form w_i = min(lambda w_i, cap / b), lambda >= 1. The
    saturated set is the k largest weights; with them pinned at u = cap / b the rest scale by
    lambda_k = (1 - k u) / (sum of the rest), and the answer is the smallest k whose first
    unsaturated weight stays under u. One sort and a scan, in log space so that weights that
    underflow in linear space still count: exact, branch-free, compilable.

    With `log_prior` (log pi_i, any scale; normalized here over the valid samples) the bound is
    per sample, u_i = cap * pi_i (see `_cap_weights_prior`); without it the code below runs.
    """
    if log_prior is not None:
        return _cap_weights_prior(log_w, cap, valid, log_prior)
    n = log_w.numel()
    n_valid = valid.sum()
    b = n_valid.clamp(min=1).to(log_w.dtype)
    log_u = math.log(cap) - torch.log(b)
    lws, _ = torch.sort(log_w, descending=True)  # invalid (-inf) last
    k = torch.arange(n, device=log_w.device)
    log_rest = torch.logcumsumexp(lws.flip(0), 0).flip(0)  # log(w_(k) + w_(k+1) + ...)
    pinned_left = 1.0 - k.to(log_w.dtype) * torch.exp(log_u)  # mass left for the unpinned
    # k = b - 1 always fits up to rounding (then every weight is u = 1/b)
    return _pin_the_first_that_fits(log_w, valid, lws, log_rest, pinned_left, log_u, log_u, k, n_valid)


def _pin_the_first_that_fits(log_w, valid, lws, log_rest, pinned_left, log_u_sorted, log_u, k, n_valid):
    """The scan shared by both caps: with the samples sorted in saturation order (lws, their bounds
    log_u_sorted), pinning the first k leaves `pinned_left` for the rest, so lambda_k =
    pinned_left / (w_(k) + ...); the answer is the first k with lambda_k w_(k) <= u_(k)."""
    log_left = torch.log(pinned_left.clamp(min=torch.finfo(log_w.dtype).tiny))
    # lambda_k w_(k) <= u_(k), written with differences of logs so huge |log w| keep their precision
    fits = (log_left + (lws - log_rest) <= log_u_sorted + 1e-6) & (pinned_left > 0) & (k < n_valid)
    first = torch.where(fits.any(), fits.to(torch.int8).argmax(), (n_valid - 1).clamp(min=0)).reshape(1)
    log_wi = log_left.gather(0, first) + (log_w - log_rest.gather(0, first))  # log(lambda w_i)
    w = torch.where(valid, torch.exp(torch.minimum(log_wi, log_u)), 0.0)
    return w / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


def _cap_weights_prior(log_w: torch.Tensor, cap: float, valid: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """KL projection onto {w >= 0, sum w = 1, w_i <= u_i = cap * pi_i} of the weights exp(log_w).

    Minimizing KL(v || w) = sum_i v_i log(v_i / w_i) under sum v = 1 and v_i <= u_i, the KKT
    conditions give v_i = w_i exp(-mu - nu_i), nu_i >= 0 only where v_i = u_i, i.e.
    v_i = min(lambda w_i, u_i) with lambda = e^{-mu} >= 1 (sum min(w_i, u_i) <= 1) set by sum v = 1
    (Prop. 1's form). Sample i saturates iff lambda w_i >= cap pi_i, i.e. iff its ratio w_i / pi_i
    is at least cap / lambda: the saturated set is the k largest ratios. Sorted by ratio, pinning
    the first k leaves 1 - cap * (pi_(0) + ... + pi_(k-1)) for the rest, so
    lambda_k = that / (w_(k) + w_(k+1) + ...), and the answer is the smallest k with
    lambda_k w_(k) <= cap pi_(k). Feasible for cap >= 1 (sum u = cap >= 1). Same sort-and-scan as
    the uniform case, in log space, branch-free.
    """
    n = log_w.numel()
    n_valid = valid.sum()
    neg = torch.full_like(log_w, -torch.inf)
    lp = torch.where(valid, log_prior.to(log_w.dtype), neg)
    lp = torch.where(valid, lp - torch.logsumexp(lp, 0), neg)  # log pi, normalized over the valid
    log_u = math.log(cap) + lp  # log of each sample's bound cap * pi_i (-inf when invalid)
    key = torch.where(valid, log_w - lp, neg)  # log(w_i / pi_i): the saturation order
    _, order = torch.sort(key, descending=True)  # invalid last
    lws, lus = log_w.gather(0, order), log_u.gather(0, order)
    k = torch.arange(n, device=log_w.device)
    log_rest = torch.logcumsumexp(lws.flip(0), 0).flip(0)  # log(w_(k) + w_(k+1) + ...)
    # 1 - cap * (pi_(0) + ... + pi_(k-1)) = cap * (pi_(k) + pi_(k+1) + ...) - (cap - 1): from the
    # suffix sum, so that a tail of tiny priors keeps its precision (exact for cap = 1, where w = pi).
    rest_pi = torch.exp(torch.logcumsumexp(lp.gather(0, order).flip(0), 0).flip(0))
    pinned_left = cap * rest_pi - (cap - 1.0)
    # k = b - 1 always fits up to rounding (lambda w_(b-1) = cap pi_(b-1) - (cap - 1))
    return _pin_the_first_that_fits(log_w, valid, lws, log_rest, pinned_left, lus, log_u, k, n_valid)


def sample_weights(
    losses: torch.Tensor,
    strategy: str,
    temperature: float | torch.Tensor,
    *,
    cap: float | None = None,
    valid: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights for one reweighting group (the gathered batch, in DP-rank order).

    Invalid samples (mask False or non-finite loss) get exactly 0 and don't count in b,
    f_min or f_max. Valid weights sum to 1 (all zero when nothing is valid). Computed in
    float32 whatever the input dtype; returned in float32.

    `prior` [n] (>= 0, any scale): each sample's uniform weight pi, normalized here over the valid
    samples; then w_i = pi_i exp(s_i / r) / sum_j pi_j exp(s_j / r) (logits s / r + log pi, also
    for dro_kl), so `uniform` gives w = pi, and `cap` bounds w_i <= cap * pi_i. A sample with
    pi_i = 0 (or non-finite) counts as invalid. prior=None is the row formula (pi = 1/b), unchanged.
    """
    check_strategy(strategy)
    check_temperature(temperature)
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
    if prior is not None:
        if prior.shape != losses.shape:
            raise ValueError(
                f"prior shape {tuple(prior.shape)} does not match losses shape {tuple(losses.shape)}"
            )
        p = prior.detach().to(device=f.device, dtype=torch.float32)
        ok = ok & torch.isfinite(p) & (p > 0)
    f = torch.where(ok, f, 0.0)

    if strategy == "uniform":  # exactly 1/b (pi_i with a prior), within every cap c >= 1
        u = torch.where(ok, p if prior is not None else torch.ones_like(f), 0.0)
        return u / u.sum().clamp(min=torch.finfo(u.dtype).tiny)
    if strategy == "dro_kl":  # Table 12 baseline: softmax of the raw loss
        s = f
    else:
        s = strategy_scores(normalize(f, ok), strategy)

    # Eq. (4), stable: subtract the max valid score before exp.
    z = torch.where(ok, s / temperature, -torch.inf)
    log_pi = None
    if prior is not None:  # the prior's logits: z = s / r + log pi
        log_pi = torch.where(ok, torch.log(torch.where(ok, p, 1.0)), -torch.inf)
        log_pi = torch.where(ok, log_pi - torch.logsumexp(log_pi, 0), -torch.inf)
        z = torch.where(ok, z + log_pi, -torch.inf)
    z = z - torch.where(ok, z, -torch.finfo(z.dtype).max).amax()
    if cap is not None:  # Proposition 1: w_i = min(lambda e^{z_i}, cap / b)  (cap * pi_i with a prior)
        log_w = z - torch.logsumexp(torch.where(ok, z, -torch.inf), 0)
        if log_pi is not None:
            return cap_weights(torch.where(ok, log_w, -torch.inf), float(cap), ok, log_prior=log_pi)
        return cap_weights(torch.where(ok, log_w, -torch.inf), float(cap), ok)
    e = torch.where(ok, torch.exp(z), 0.0)
    return e / e.sum().clamp(min=torch.finfo(e.dtype).tiny)


@dataclass
class TemperatureSchedule:
    """Appendix A.2: the first `warmup_steps` steps are a warm-up, then the target r.

    `warmup_mode="temperature"` (default): r = warmup_temperature during the warm-up (near-uniform weights,
    fms-fsdp's warm-up). `"uniform"`: a burn-in, weights exactly uniform (1/b; the token shares at
    document granularity), as in the GPT-2 reference code; no r applies, so `__call__` is None there.
    After the warm-up, `anneal="constant"` jumps to the target; `"linear"`/`"cosine"` go from
    warmup_temperature to target over `anneal_steps`. Steps count from 1 like TorchTitan's: steps
    1..warmup_steps are the warm-up. A pure function of the step (checkpointed: the last step asked).
    """

    target: float = 1.0
    warmup_temperature: float = 100.0
    warmup_steps: int = 0
    anneal: str = "constant"
    anneal_steps: int = 0
    warmup_mode: str = "temperature"

    def __post_init__(self):
        for name in ("target", "warmup_temperature"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"temperature {name} must be a finite number > 0, got {v!r}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"unknown temperature anneal {self.anneal!r}; valid: {', '.join(ANNEALS)}")
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"unknown warmup_mode {self.warmup_mode!r}; valid: {', '.join(WARMUP_MODES)}")
        if self.warmup_steps < 0 or self.anneal_steps < 0:
            raise ValueError("temperature warmup_steps and anneal_steps must be >= 0")
        if self.anneal != "constant" and self.anneal_steps == 0:
            raise ValueError(f"anneal={self.anneal!r} needs anneal_steps > 0")
        self.last_step = 0

    def burn_in(self, step: int) -> bool:
        """True on the steps of a uniform burn-in (weights exactly uniform, the strategy unused)."""
        return self.warmup_mode == "uniform" and step <= self.warmup_steps

    def phase(self, step: int) -> str:
        """What step `step` does: "burn-in" (uniform weights), "warm-up" (r = warmup_temperature),
        "anneal" (r between warmup_temperature and target) or "target"."""
        t = step - self.warmup_steps
        if t <= 0:
            return "burn-in" if self.warmup_mode == "uniform" else "warm-up"
        return "anneal" if self.anneal != "constant" and t < self.anneal_steps else "target"

    def __call__(self, step: int) -> float | None:
        """r of step `step`; None during a uniform burn-in (no temperature applies)."""
        self.last_step = step
        t = step - self.warmup_steps  # steps past the warm-up
        if t <= 0:
            return None if self.warmup_mode == "uniform" else float(self.warmup_temperature)
        if self.anneal == "constant" or t >= self.anneal_steps:
            return float(self.target)
        frac = t / self.anneal_steps
        if self.anneal == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return float(self.warmup_temperature + (self.target - self.warmup_temperature) * frac)

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "target": self.target,
            "warmup_temperature": self.warmup_temperature,
            "warmup_steps": self.warmup_steps,
            "anneal": self.anneal,
            "anneal_steps": self.anneal_steps,
            "warmup_mode": self.warmup_mode,
        }

    def load_state_dict(self, state: dict) -> None:
        # The configured shape wins (a user may change the target on resume); the step resumes.
        self.last_step = int(state["last_step"])


# Slots per row (config key reweight.max_documents_per_row): a row with more fragments merges its tail into
# the last slot, which is then a "merged" slot and keeps its token share. An 8192-token row overflows
# 64 slots only when its documents average under 128 tokens; [B, 64] per-row slots cost nothing.
DEFAULT_MAX_DOCUMENTS = 64

# Fragments with fewer valid tokens than this keep their token share (config key
# reweight.min_document_tokens). Why 32:
# - Noise. f_d is a mean over n_d tokens, standard error ~ sigma_token / sqrt(n_d), and per-token NLL
#   is broad (sigma_token of the order of 2-3 nats in LM pretraining; an assumption, not measured
#   here): ~0.5 sigma_token at n = 4, ~0.18 sigma_token at n = 32, ~0.09 at n = 128. Below ~32 the
#   noise is as large as the spread of document losses the strategies rank, and min-max
#   normalization (Alg. 1 line 5) lets one noisy extreme squash every other h.
# - Cost. A row has at most two fragments that are short only because the row cuts them (the
#   continuation at its start, the document cut at its end): at most 2 * 31 tokens, <= 0.8% of an
#   8192-token row (3% of 2048). Other short fragments are genuinely tiny documents, few tokens in
#   all. Keeping these at their token share (plain training) loses little of the reweighting.
# Raise it to rank only longer documents; 0 or 1 ranks every non-empty fragment.
DEFAULT_MIN_DOCUMENT_TOKENS = 32


@dataclass(kw_only=True, slots=True)
class ReweightConfig:
    """`[reweight]`: the weights of Algorithm 1 (docs/design.md §2)."""

    strategy: str = "linupper"
    """One of uniform, linupper, upper (the GPT-2 reference code's linear ramp s = h/2 + 1/2, not
    fms-fsdp's "upper"), quadratic, extremes, dro_kl (docs/design.md §2, §9)."""
    temperature: float = 1.0
    """Target temperature r (paper: 1.0 for 1.4B, 2.0 for 7B)."""
    warmup_temperature: float = 100.0
    """Temperature during the warm-up steps (Appendix A.2: r = 100)."""
    warmup_steps: int = 0
    """Steps of the warm-up (steps 1..warmup_steps), before the target."""
    warmup_mode: Literal["temperature", "uniform"] = "temperature"
    """What the warm-up does: "temperature" trains at r = warmup_temperature (Appendix A.2);
    "uniform" with weights exactly 1/b (document granularity: the token shares), the plain loss
    (the GPT-2 reference code's burn-in), then the strategy (docs/design.md §2)."""
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
    granularity: Literal["row", "document"] = "row"
    """What a sample is: a packed row (the paper), or each document fragment inside a row
    (titan_rw.documents: w_d ∝ π_d e^{s_d/r}, π_d = the fragment's token share, so `uniform` is the
    plain token-mean loss; the bound is w_d ≤ 2 π_d; docs/design.md §2)."""
    min_document_tokens: int = DEFAULT_MIN_DOCUMENT_TOKENS
    """granularity = "document": fragments with fewer valid tokens keep their token share π_d
    (their mean loss is too noisy to rank); 0 ranks every fragment."""
    max_documents_per_row: int = DEFAULT_MAX_DOCUMENTS
    """granularity = "document": fragment slots per row; a row with more fragments merges its tail
    into the last slot (kept at its token share; counted as `overflow_rows` in metrics.jsonl)."""

    def validate(self) -> None:
        check_strategy(self.strategy)
        if self.granularity not in ("row", "document"):
            raise ValueError(f"reweight.granularity must be 'row' or 'document', got {self.granularity!r}")
        if self.min_document_tokens < 0:
            raise ValueError(f"reweight.min_document_tokens must be >= 0, got {self.min_document_tokens}")
        if self.max_documents_per_row < 1:
            raise ValueError(f"reweight.max_documents_per_row must be >= 1, got {self.max_documents_per_row}")
        if self.cap is not None and not self.cap >= 1:
            raise ValueError(f"reweight.cap must be >= 1 (or unset), got {self.cap}")
        if self.loss_chunks < 1:
            raise ValueError(f"reweight.loss_chunks must be >= 1, got {self.loss_chunks}")
        if self.warmup_mode not in WARMUP_MODES:
            raise ValueError(f"reweight.warmup_mode {self.warmup_mode!r} is unknown; valid: {', '.join(WARMUP_MODES)}")
        self.schedule()  # validates temperatures / anneal

    def warmup_warning(self, total_steps: int) -> str | None:
        """One line when the warm-up covers every step of a `total_steps` run (the strategy's
        target r never applies), else None."""
        if self.warmup_steps <= 0 or self.warmup_steps < total_steps:
            return None
        what = ("trains with exactly uniform weights (warmup_mode = \"uniform\")" if self.warmup_mode == "uniform"
                else f"keeps r = reweight.warmup_temperature = {self.warmup_temperature:g} (near-uniform weights)")
        return (f"reweight.warmup_steps = {self.warmup_steps} covers all training.steps = {total_steps}: the whole run "
                f"{what} and the {self.strategy} weights at r = {self.temperature:g} never apply; lower "
                f"reweight.warmup_steps below training.steps to reweight")

    def schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule(
            target=self.temperature,
            warmup_temperature=self.warmup_temperature,
            warmup_steps=self.warmup_steps,
            anneal=self.anneal,
            anneal_steps=self.anneal_steps,
            warmup_mode=self.warmup_mode,
        )

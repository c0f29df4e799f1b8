"""Tests of titan_rw.reweight against the paper (Section 4.2, Alg. 1, Eq. 4, Prop. 1) and docs/design.md §2.

The reference below is written from the paper's formulas in plain Python float64 (math only, no
torch), independently of the module under test. Where the paper is silent (the flat-range rule for a ~zero
loss range, invalid samples, the cap), it follows the contract in docs/design.md §2.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from titan_rw.reweight import STRATEGIES, ReweightConfig, TemperatureSchedule, sample_weights

NORMALIZED = ("uniform", "linupper", "upper", "quadratic", "extremes")
RANGE_EPS = 1e-6  # titan_rw's flat-range rule (docs/design.md §2): a loss range <= this counts as flat

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Plain-Python float64 reference of the paper's formulas
# ----------------------------------------------------------------------------------------------
def _score(h: float, strategy: str) -> float:
    # Section 4.2 with alpha = 1 (and the GPT-2 reference code's `upper`).
    if strategy == "uniform":
        return 0.0
    if strategy == "linupper":
        return min(h + 1.0, 1.0)
    if strategy == "upper":  # the GPT-2 reference code's linear ramp
        return 0.5 * h + 0.5
    if strategy == "quadratic":
        return 1.0 * (1.0 - h * h / 1.0)
    if strategy == "extremes":
        return abs(h)
    raise AssertionError(strategy)


def _project_capped(logw: list[float], u: float) -> list[float]:
    """KL projection onto {w >= 0, sum 1, w <= u}: w_i = min(lam * w_i, u), sum = 1 (Prop. 1 form).

    Solved by bisection on log(lam) in float64, in the log domain so that weights that underflow
    in exp() are still scaled correctly.
    """

    def total(t: float) -> float:
        return math.fsum(math.exp(min(t + lw, math.log(u))) for lw in logw)

    if total(0.0) >= 1.0 - 1e-15:  # the cap does not bind
        return [math.exp(lw) for lw in logw]
    lo, hi = 0.0, max(math.log(u) - lw for lw in logw)  # at hi every weight is pinned: sum = b u >= 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(mid) < 1.0:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return [math.exp(min(t + lw, math.log(u))) for lw in logw]


def reference_weights(losses, strategy, r, cap=None, valid=None) -> list[float]:
    losses = [float(x) for x in losses]
    keep = [
        i for i, f in enumerate(losses) if math.isfinite(f) and (valid is None or bool(valid[i]))
    ]
    out = [0.0] * len(losses)
    if not keep:
        return out
    f = [losses[i] for i in keep]
    b = len(f)
    if strategy == "dro_kl":
        s = f  # Table 12 baseline: softmax of the raw loss
    else:
        f_min, f_max = min(f), max(f)
        if f_max - f_min <= RANGE_EPS:
            h = [0.0] * b
        else:  # Alg. 1 line 5
            h = [2.0 * (x - f_min) / (f_max - f_min) - 1.0 for x in f]
        s = [_score(x, strategy) for x in h]
    # Eq. (4) in log space.
    z = [x / r for x in s]
    m = max(z)
    log_total = math.log(math.fsum(math.exp(x - m) for x in z))
    logw = [(x - m) - log_total for x in z]
    w = _project_capped(logw, cap / b) if cap is not None else [math.exp(x) for x in logw]
    for i, wi in zip(keep, w):
        out[i] = wi
    return out


def _t(xs, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


def _assert_matches_reference(w: torch.Tensor, ref: list[float], atol=2e-7, rtol=2e-5):
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), torch.tensor(ref, dtype=torch.float64), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# Reference comparison on random losses
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("b", [1, 2, 3, 17, 128, 1000])
@pytest.mark.parametrize("temperature", [0.4, 1.0, 2.0, 100.0])
def test_matches_float64_reference(strategy, b, temperature):
    rng = random.Random(1000 * b + int(10 * temperature) + STRATEGIES.index(strategy))
    losses = _t([rng.uniform(0.5, 8.0) for _ in range(b)])
    w = sample_weights(losses, strategy, temperature)
    assert w.shape == losses.shape
    _assert_matches_reference(w, reference_weights(losses.tolist(), strategy, temperature))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cap", [1.5, 2.0, 4.0])  # cap = 1: test_cap_one_is_uniform_*
def test_capped_matches_float64_reference(strategy, cap):
    rng = random.Random(7 + STRATEGIES.index(strategy))
    for b in (1, 2, 5, 64):
        losses = _t([rng.expovariate(0.5) for _ in range(b)])
        valid = torch.tensor([rng.random() > 0.2 for _ in range(b)])
        for r in (0.2, 1.0):
            w = sample_weights(losses, strategy, r, cap=cap, valid=valid)
            ref = reference_weights(losses.tolist(), strategy, r, cap=cap, valid=valid.tolist())
            _assert_matches_reference(w, ref)


@pytest.mark.parametrize(
    "strategy, losses, temperature",
    [
        # LinUpper at a sharp temperature: the low losses' weights are ~exp(-100) relative.
        ("linupper", [5.0] + [1.0] * 127, 0.01),
        # DRO-KL on raw losses with a loss gap of 200 (exp(-200) underflows in fp32).
        ("dro_kl", [200.0] + [0.0] * 127, 1.0),
        ("dro_kl", [1e30, 0.0, 5.0, 1e29], 1.0),
    ],
)
def test_cap_holds_when_small_weights_underflow(strategy, losses, temperature):
    """The cap must hold however sharp the softmax: max w <= c/b and the Prop. 1 form."""
    f = _t(losses)
    b = f.numel()
    w = sample_weights(f, strategy, temperature, cap=2.0)
    assert w.max().item() <= 2.0 / b + 1e-7
    _assert_matches_reference(w, reference_weights(f.tolist(), strategy, temperature, cap=2.0))


# ----------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ----------------------------------------------------------------------------------------------
def losses_st(min_size=1, max_size=64, lo=0.0, hi=20.0):
    return st.lists(
        st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32),
        min_size=min_size,
        max_size=max_size,
    )


strategy_st = st.sampled_from(STRATEGIES)
# dro_kl scores are raw losses (<= 20): z = s / r spans <= 100, so no weight underflows in fp32.
# Sharper softmaxes are covered by test_cap_holds_when_small_weights_underflow.
temperature_st = st.floats(0.2, 50.0)
# c = 1 exactly is covered by test_cap_one_is_uniform_* (a known bug with masks).
cap_st = st.floats(1.0, 4.0, exclude_min=True)


def _valid_sum(w, valid=None):
    return (w if valid is None else w[valid]).double().sum().item()


@FAST
@given(losses=losses_st(), strategy=strategy_st, r=temperature_st, mask_seed=st.integers(0, 2**31))
def test_sums_to_one_and_nonnegative(losses, strategy, r, mask_seed):
    f = _t(losses)
    g = torch.Generator().manual_seed(mask_seed)
    valid = torch.rand(f.numel(), generator=g) > 0.3
    w = sample_weights(f, strategy, r, valid=valid)
    assert torch.all(w >= 0)
    assert torch.all(w[~valid] == 0)
    if valid.any():
        assert _valid_sum(w, valid) == pytest.approx(1.0, abs=1e-5)
    else:
        assert torch.all(w == 0)  # contract: all zero if none is valid


@FAST
@given(losses=losses_st(min_size=2), strategy=strategy_st, r=temperature_st, data=st.data())
def test_permutation_equivariance(losses, strategy, r, data):
    f = _t(losses)
    perm = torch.tensor(data.draw(st.permutations(range(f.numel()))))
    cap = data.draw(st.none() | cap_st)
    w = sample_weights(f, strategy, r, cap=cap)
    wp = sample_weights(f[perm], strategy, r, cap=cap)
    torch.testing.assert_close(wp, w[perm], rtol=1e-5, atol=1e-8)


@FAST
@given(
    losses=losses_st(min_size=2, lo=0.0, hi=10.0),
    strategy=st.sampled_from(NORMALIZED),
    r=temperature_st,
    a=st.floats(0.1, 10.0),
    c=st.floats(-10.0, 10.0),
)
def test_normalized_strategies_invariant_to_affine_loss_maps(losses, strategy, r, a, c):
    f = _t(losses)
    # Keep the range far from the 1e-6 guard before and after the map so it cannot flip.
    assume((f.max() - f.min()).item() >= 0.05)
    w = sample_weights(f, strategy, r)
    wa = sample_weights(a * f + c, strategy, r)
    torch.testing.assert_close(wa, w, rtol=1e-4, atol=1e-6)


@FAST
@given(losses=losses_st(min_size=1, hi=10.0), r=temperature_st, c=st.floats(-10.0, 10.0))
def test_dro_kl_invariant_to_loss_shift(losses, r, c):
    f = _t(losses)
    torch.testing.assert_close(
        sample_weights(f + c, "dro_kl", r), sample_weights(f, "dro_kl", r), rtol=1e-4, atol=1e-6
    )


@FAST
@given(
    losses=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64),
    r=temperature_st,
    mask_seed=st.integers(0, 2**31),
)
def test_uniform_is_exactly_one_over_b(losses, r, mask_seed):
    f = _t(losses)
    g = torch.Generator().manual_seed(mask_seed)
    valid = torch.rand(f.numel(), generator=g) > 0.3
    w = sample_weights(f, "uniform", r, valid=valid)
    ok = valid & torch.isfinite(f)
    b = int(ok.sum())
    expected = torch.where(ok, torch.tensor(1.0) / max(b, 1), torch.tensor(0.0))
    assert torch.equal(w, expected)


@FAST
@given(
    value=st.floats(-1e6, 1e6, width=32),
    b=st.integers(1, 300),
    strategy=strategy_st,
    r=st.floats(0.01, 100.0),
)
def test_all_equal_losses_give_one_over_b(value, b, strategy, r):
    w = sample_weights(torch.full((b,), value), strategy, r)
    assert torch.equal(w, torch.full((b,), 1.0) / b)


@FAST
@given(losses=losses_st(min_size=1, hi=10.0), strategy=strategy_st)
def test_large_temperature_tends_to_uniform(losses, strategy):
    f = _t(losses)
    b = f.numel()
    dev = [(sample_weights(f, strategy, r) * b - 1).abs().max().item() for r in (1.0, 1e2, 1e4, 1e6)]
    assert dev[-1] < 1e-4
    for hot, cold in zip(dev[1:], dev[:-1]):
        assert hot <= cold + 1e-6


@FAST
@given(
    losses=losses_st(min_size=1, max_size=40),
    strategy=strategy_st,
    r=temperature_st,
    cap=st.none() | cap_st,
    data=st.data(),
)
def test_invalid_samples_get_zero_and_do_not_move_min_max(losses, strategy, r, cap, data):
    n = len(losses)
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    # Invalid positions hold extreme or non-finite values: they must not move f_min/f_max.
    junk = data.draw(
        st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0]), min_size=n, max_size=n)
    )
    masked = [x if m else j for x, m, j in zip(losses, mask, junk)]
    f, valid = _t(masked), torch.tensor(mask)
    w = sample_weights(f, strategy, r, cap=cap, valid=valid)
    assert torch.all(w[~valid] == 0)
    assert torch.all(torch.isfinite(w))
    if valid.any():
        alone = sample_weights(f[valid], strategy, r, cap=cap)
        torch.testing.assert_close(w[valid], alone, rtol=1e-5, atol=1e-8)


@FAST
@given(losses=losses_st(min_size=1, max_size=40), strategy=strategy_st, r=temperature_st)
def test_non_finite_losses_are_invalid(losses, strategy, r):
    """Without a mask, NaN/±inf losses are invalid: weight exactly 0, the rest as if absent."""
    f = _t(losses + [math.nan, math.inf, -math.inf])
    perm = torch.randperm(f.numel(), generator=torch.Generator().manual_seed(len(losses)))
    f = f[perm]
    w = sample_weights(f, strategy, r)
    bad = ~torch.isfinite(f)
    assert torch.all(w[bad] == 0)
    torch.testing.assert_close(w[~bad], sample_weights(f[~bad], strategy, r), rtol=1e-5, atol=1e-8)


def _assert_prop1_form(wc: torch.Tensor, w: torch.Tensor, u: float):
    """wc_i == min(lam * w_i, u) for one lam >= 1, lam recovered from an unsaturated entry."""
    wc, w = wc.double(), w.double()
    unsat = (wc < u * (1 - 1e-5)) & (w > 0)
    if unsat.any():
        i = torch.argmax(torch.where(unsat, w, -1.0))  # the largest unsaturated entry: best precision
        lam = (wc[i] / w[i]).item()
        assert lam >= 1.0 - 1e-5
        torch.testing.assert_close(wc, torch.clamp(lam * w, max=u), rtol=1e-4, atol=1e-8)
    else:  # everything pinned: all at the cap (only possible with c = 1)
        torch.testing.assert_close(wc, torch.full_like(wc, u), rtol=1e-5, atol=0)


@FAST
@given(losses=losses_st(min_size=1, max_size=200), strategy=strategy_st, r=temperature_st, c=cap_st)
def test_cap_bounds_and_has_proposition_1_form(losses, strategy, r, c):
    f = _t(losses)
    b = f.numel()
    w = sample_weights(f, strategy, r)
    wc = sample_weights(f, strategy, r, cap=c)
    assert wc.max().item() <= c / b + 1e-7
    assert torch.all(wc >= 0)
    assert _valid_sum(wc) == pytest.approx(1.0, abs=1e-5)
    _assert_prop1_form(wc, w, c / b)


@FAST
@given(losses=losses_st(min_size=1, max_size=100), strategy=strategy_st, r=temperature_st, c=st.floats(1.0, 8.0))
def test_non_binding_cap_leaves_weights_unchanged(losses, strategy, r, c):
    f = _t(losses)
    w = sample_weights(f, strategy, r)
    assume(w.max().item() <= (c / f.numel()) * (1 - 1e-4))
    torch.testing.assert_close(sample_weights(f, strategy, r, cap=c), w, rtol=1e-5, atol=1e-9)


def _cap_one_cases():
    for b in (1, 9, 20, 25, 31, 50):
        f = torch.linspace(0.0, 2.0, b + 1)
        valid = torch.arange(b + 1) != b // 2  # one invalid sample in the middle
        yield b, f, valid


def test_cap_one_is_uniform_without_mask():
    for b, f, valid in _cap_one_cases():
        for strategy in STRATEGIES:
            w = sample_weights(f[valid], strategy, 1.0, cap=1.0)
            torch.testing.assert_close(w, torch.full((b,), 1 / b), rtol=1e-5, atol=0)


def test_cap_one_is_uniform_over_valid():
    """c = 1 pins every valid weight at 1/b (the projection's only feasible point)."""
    for b, f, valid in _cap_one_cases():
        for strategy in STRATEGIES:
            w = sample_weights(f, strategy, 1.0, cap=1.0, valid=valid)
            assert w[b // 2] == 0
            torch.testing.assert_close(w[valid], torch.full((b,), 1 / b), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# The counterexample (docs/design.md §2): LinUpper can break Theorem 1's precondition without a cap
# ----------------------------------------------------------------------------------------------
def test_linupper_counterexample_breaks_bound_without_cap_and_cap_restores_it():
    b = 128
    f = torch.full((b,), 1.0)
    f[17] = 9.0  # one high loss among equal low ones
    w = sample_weights(f, "linupper", 1.0)
    assert w.max().item() > 2.0 / b
    assert w.max().item() == pytest.approx(math.e / (math.e + b - 1), rel=1e-6)
    assert w.argmax().item() == 17
    wc = sample_weights(f, "linupper", 1.0, cap=2.0)
    assert wc.max().item() <= 2.0 / b + 1e-7
    assert wc.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert wc.argmax().item() == 17


# ----------------------------------------------------------------------------------------------
# Dtypes and numerics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp32_and_bf16_inputs(strategy):
    g = torch.Generator().manual_seed(3)
    f32 = torch.rand(257, generator=g) * 6 + 1
    bf = f32.to(torch.bfloat16)
    w32 = sample_weights(f32, strategy, 1.0)
    wbf = sample_weights(bf, strategy, 1.0)
    assert w32.dtype == wbf.dtype == torch.float32
    # bf16 input: weights of the bf16-rounded losses, computed in fp32.
    torch.testing.assert_close(wbf, sample_weights(bf.float(), strategy, 1.0), rtol=1e-6, atol=1e-9)
    _assert_matches_reference(wbf, reference_weights(bf.float().tolist(), strategy, 1.0))
    # and close to the fp32 weights (bf16 rounding moves the losses by <= 2^-8 relative).
    torch.testing.assert_close(wbf, w32, rtol=0.1, atol=1e-4)
    assert sample_weights(f32.double(), strategy, 1.0).dtype == torch.float32


EXTREME_LOSSES = [
    [1e30, 0.0, 5.0, 1e29],
    [1e30] * 5 + [0.0],
    [-1e30, 1e30, 0.0],
    [1.0 + 1e-7 * i for i in range(8)],  # range below the flat-range rule: flat
    [1e-30 * i for i in range(8)],
    [0.0, 2e-6, 1e-6, 5e-7],  # range just above it
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("losses", EXTREME_LOSSES)
def test_extreme_losses_stay_finite(strategy, losses):
    f = _t(losses)
    w = sample_weights(f, strategy, 1.0)
    assert torch.all(torch.isfinite(w)) and torch.all(w >= 0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5)
    _assert_matches_reference(w, reference_weights(f.tolist(), strategy, 1.0))


@pytest.mark.parametrize("strategy", NORMALIZED)  # dro_kl + cap on 1e30 gaps: the underflow test
@pytest.mark.parametrize("losses", EXTREME_LOSSES)
def test_extreme_losses_stay_finite_with_cap(strategy, losses):
    f = _t(losses)
    w = sample_weights(f, strategy, 1.0, cap=2.0)
    assert torch.all(torch.isfinite(w)) and torch.all(w >= 0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert w.max().item() <= 2.0 / f.numel() + 1e-7


def test_losses_near_fp32_max_stay_finite():
    """Finite fp32 losses of any size are valid: the normalization must not overflow."""
    for losses in ([3e38, 0.0, 1.0], [3e38, -3e38, 0.0], [-3e38, 1.0, 2.0]):
        f = _t(losses)
        for strategy in STRATEGIES:
            w = sample_weights(f, strategy, 1.0)
            assert torch.all(torch.isfinite(w)), (losses, strategy, w)
            assert w.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_tiny_range_is_flat():
    f = _t([1.0 + 1e-7 * i for i in range(8)])  # f_max - f_min < 1e-6: the flat-range rule gives h = 0
    for strategy in NORMALIZED:
        assert torch.equal(sample_weights(f, strategy, 0.3), torch.full((8,), 1.0) / 8)


# ----------------------------------------------------------------------------------------------
# Fail-fast argument errors
# ----------------------------------------------------------------------------------------------
def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown reweighting strategy") as e:
        sample_weights(torch.rand(4), "lin_upper", 1.0)
    for name in STRATEGIES:
        assert name in str(e.value)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf, -math.inf, "1.0", None])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        sample_weights(torch.rand(4), "linupper", temperature)


@pytest.mark.parametrize("cap", [0.0, 0.5, 0.999, -2.0, math.nan, math.inf])
def test_bad_cap(cap):
    with pytest.raises(ValueError, match="cap"):
        sample_weights(torch.rand(4), "linupper", 1.0, cap=cap)


@pytest.mark.parametrize("shape", [(), (2, 3), (4, 1)])
def test_losses_must_be_1d(shape):
    with pytest.raises(ValueError, match="1-D"):
        sample_weights(torch.rand(shape), "linupper", 1.0)


@pytest.mark.parametrize("mask_shape", [(3,), (5,), (4, 1)])
def test_mask_shape_mismatch(mask_shape):
    with pytest.raises(ValueError, match="mask shape"):
        sample_weights(torch.rand(4), "linupper", 1.0, valid=torch.ones(mask_shape, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiles_fullgraph_with_cap_mask_and_tensor_temperature(strategy, inductor_cache):
    """One compile per strategy: the most demanding path (cap, mask, non-finite loss, 0-d tensor r)."""
    g = torch.Generator().manual_seed(11)
    f = torch.rand(96, generator=g) * 4
    f[5] = math.nan
    f[40] = 7.0  # a high loss: the cap binds at r = 0.3
    valid = torch.rand(96, generator=g) > 0.1
    torch._dynamo.reset()  # dynamo caches per code object: start clean so a recompile is visible
    fn = torch.compile(sample_weights, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for r in (0.3, 2.0):  # a new tensor temperature value reuses the graph
            rt = torch.tensor(r)
            got = fn(f, strategy, rt, cap=2.0, valid=valid)
            want = sample_weights(f, strategy, rt, cap=2.0, valid=valid)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
            assert torch.all(got[~valid | ~torch.isfinite(f)] == 0)


@pytest.mark.slow
def test_compiles_fullgraph_float_temperature_no_cap(inductor_cache):
    f = torch.rand(33, generator=torch.Generator().manual_seed(12))
    fn = torch.compile(sample_weights, fullgraph=True, dynamic=False)
    torch.testing.assert_close(fn(f, "linupper", 1.0), sample_weights(f, "linupper", 1.0), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# TemperatureSchedule (Appendix A.2)
# ----------------------------------------------------------------------------------------------
def test_schedule_constant_warmup_then_target():
    s = TemperatureSchedule(target=1.0, warmup_temperature=100.0, warmup_steps=10)
    assert [s(t) for t in (1, 5, 10)] == [100.0, 100.0, 100.0]
    assert [s(t) for t in (11, 12, 1000)] == [1.0, 1.0, 1.0]
    assert TemperatureSchedule(target=2.0)(1) == 2.0  # no warm-up: the target from step 1


@pytest.mark.parametrize("anneal", ["linear", "cosine"])
@pytest.mark.parametrize("target, warm", [(1.0, 100.0), (5.0, 0.5)])
def test_schedule_anneal_endpoints_and_monotone(anneal, target, warm):
    s = TemperatureSchedule(target=target, warmup_temperature=warm, warmup_steps=20, anneal=anneal, anneal_steps=50)
    vals = [s(t) for t in range(1, 120)]
    assert all(v == warm for v in vals[:20])  # steps 1..20
    assert s(20 + 50) == pytest.approx(target) and s(119) == target
    sign = 1 if target > warm else -1
    assert all(sign * (b - a) >= 0 for a, b in zip(vals, vals[1:]))
    assert min(vals) == min(target, warm) and max(vals) == max(target, warm)
    mid = s(20 + 25)
    assert mid == pytest.approx(0.5 * (target + warm))  # both linear and cosine pass the midpoint
    if anneal == "linear":
        assert s(20 + 10) == pytest.approx(warm + (target - warm) * 0.2)
    else:
        assert s(20 + 10) == pytest.approx(warm + (target - warm) * 0.5 * (1 - math.cos(math.pi * 0.2)))


def test_schedule_resume_keeps_the_step_and_the_configured_shape():
    """The value is a pure function of the step, so a resume is right when (1) the step comes back
    and (2) the run's configured shape is used, not the saved one (a user may change the target or
    the anneal on resume). A version that restored the saved target answers 1.0 below instead of
    the configured 2.0; one that lost the step answers the warm-up value at the next call."""
    a = TemperatureSchedule(target=1.0, warmup_temperature=100.0, warmup_steps=5, anneal="cosine", anneal_steps=10)
    for t in range(1, 9):
        a(t)
    state = a.state_dict()
    assert state["last_step"] == 8
    b = TemperatureSchedule(target=2.0, warmup_temperature=100.0, warmup_steps=5, anneal="cosine", anneal_steps=10)
    b.load_state_dict(state)
    assert b.last_step == 8
    # Appendix A.2's cosine anneal, written here: r = r_warm + (r_target - r_warm)(1 - cos(pi t/T))/2
    want = [100.0 + (2.0 - 100.0) * 0.5 * (1 - math.cos(math.pi * (t - 5) / 10)) if t < 15 else 2.0
            for t in range(9, 20)]
    assert [b(t) for t in range(9, 20)] == pytest.approx(want)
    assert b(15) == 2.0 and a(15) == 1.0
    assert b.state_dict() == dict(state, target=2.0, last_step=15)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target=0.0),
        dict(target=-1.0),
        dict(target=math.nan),
        dict(target=math.inf),
        dict(warmup_temperature=0.0),
        dict(warmup_temperature=math.inf),
        dict(warmup_steps=-1),
        dict(anneal_steps=-1),
        dict(anneal="exponential"),
        dict(anneal="linear", anneal_steps=0),
        dict(anneal="cosine"),
    ],
)
def test_schedule_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        TemperatureSchedule(**kwargs)


# ----------------------------------------------------------------------------------------------
# Parity with the reference code (issue 23, docs/design.md §9)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [2, 3, 16, 129, 1024])
@pytest.mark.parametrize("r", [0.5, 1.0, 7.0, 100.0])
def test_upper_is_the_linear_ramp(b, r):
    """`upper` = the GPT-2 code's s = h/2 + 1/2, from a float64 reference written here in full (not
    through `_score`): min-max onto [-1, 1], the ramp, softmax(s / r)."""
    rng = random.Random(31 * b + int(10 * r))
    f = [rng.uniform(1.0, 9.0) for _ in range(b)]
    lo, hi = min(f), max(f)
    s = [0.5 * (2.0 * (x - lo) / (hi - lo) - 1.0) + 0.5 for x in f]  # = (f - f_min) / (f_max - f_min)
    e = [math.exp((x - 1.0) / r) for x in s]
    ref = [x / math.fsum(e) for x in e]
    _assert_matches_reference(sample_weights(_t(f), "upper", r), ref)


def test_upper_by_hand_and_unlike_linupper():
    # losses 0, 1, 2: h = -1, 0, 1; upper s = 0, 1/2, 1 (a ramp); linupper s = 0, 1, 1 (saturates at h >= 0)
    f = _t([0.0, 1.0, 2.0])
    e = [1.0, math.exp(0.5), math.e]
    assert sample_weights(f, "upper", 1.0).tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-6)
    e = [1.0, math.e, math.e]
    assert sample_weights(f, "linupper", 1.0).tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-6)


def _reference_code_h(f: list[float]) -> list[float]:
    """The references' normalization (both code bases): divide by max(f_max - f_min, 1e-6)."""
    lo, hi = min(f), max(f)
    return [2.0 * (x - lo) / max(hi - lo, 1e-6) - 1.0 for x in f]


def test_flat_range_rule_differs_from_the_references_only_for_spreads_up_to_1e_6():
    """docs/design.md §9's numbers: at b = 2 and a spread of exactly 1e-6 the references give h = -1, 1
    (LinUpper / upper: w = 1/(1 + e), e/(1 + e) at r = 1, 0.23 from 1/2), titan_rw h = 0 (w = 1/2).
    Above 1e-6 both rules are the same map."""
    f = [0.0, 1e-6]
    h = _reference_code_h(f)
    assert h == [-1.0, 1.0]
    for strategy in ("linupper", "upper"):
        s = [_score(x, strategy) for x in h]
        e = [math.exp(x) for x in s]
        ref_max = max(e) / sum(e)
        assert ref_max - 0.5 == pytest.approx(0.2311, abs=1e-4)
        ours = sample_weights(torch.tensor(f, dtype=torch.float64).float(), strategy, 1.0)
        assert torch.equal(ours, torch.full((2,), 0.5))
    for strategy in ("quadratic", "extremes"):  # symmetric scores: no difference at b = 2
        s = [_score(x, strategy) for x in h]
        assert s[0] == s[1]
    # a spread of 1e-3: the two rules agree
    f = [2.0, 2.001]
    s = [_score(x, "linupper") for x in _reference_code_h(f)]
    e = [math.exp(x) for x in s]
    _assert_matches_reference(sample_weights(_t(f), "linupper", 1.0), [x / sum(e) for x in e], atol=1e-3)


@pytest.mark.parametrize("cap", [None, 1.0, 2.0])
def test_uniform_is_exactly_one_over_b_or_the_prior_with_any_cap(cap):
    f = _t([0.5, 3.0, 9.0, 1.0, 2.0])
    assert torch.equal(sample_weights(f, "uniform", 0.01, cap=cap), torch.full((5,), 1.0) / 5)
    prior = _t([3.0, 1.0, 0.0, 4.0, 2.0])  # sums to 10: pi = 0.3, 0.1, 0, 0.4, 0.2
    w = sample_weights(f, "uniform", 0.01, cap=cap, prior=prior)
    assert torch.equal(w, prior / prior.sum())


def test_schedule_uniform_burn_in():
    """warmup_mode = "uniform": steps 1..warmup_steps have no temperature (None) and phase burn-in;
    then the target (constant) or the anneal from warmup_temperature; a pure function of the step."""
    s = TemperatureSchedule(target=2.0, warmup_temperature=100.0, warmup_steps=3, warmup_mode="uniform")
    assert [s(t) for t in (1, 2, 3, 4, 50)] == [None, None, None, 2.0, 2.0]
    assert [s.burn_in(t) for t in (1, 3, 4)] == [True, True, False]
    assert [s.phase(t) for t in (1, 3, 4)] == ["burn-in", "burn-in", "target"]
    assert [s(t) for t in (50, 1, 4)] == [2.0, None, 2.0]  # any order: no hidden state
    a = TemperatureSchedule(target=1.0, warmup_temperature=10.0, warmup_steps=2, anneal="linear", anneal_steps=4,
                            warmup_mode="uniform")
    assert [a(t) for t in range(1, 8)] == [None, None, 7.75, 5.5, 3.25, 1.0, 1.0]
    assert [a.phase(t) for t in (2, 3, 5, 6)] == ["burn-in", "anneal", "anneal", "target"]
    t = TemperatureSchedule(target=1.0, warmup_temperature=100.0, warmup_steps=2)  # today's default mode
    assert [t(x) for x in (1, 2, 3)] == [100.0, 100.0, 1.0] and not t.burn_in(1)
    assert [t.phase(x) for x in (2, 3)] == ["warm-up", "target"]
    assert s.state_dict()["warmup_mode"] == "uniform"
    with pytest.raises(ValueError, match="warmup_mode"):
        TemperatureSchedule(warmup_mode="burn-in")


def test_config_warmup_mode_and_the_warm_up_longer_than_the_run():
    cfg = ReweightConfig(warmup_steps=2000, warmup_mode="uniform")
    cfg.validate()
    assert cfg.schedule()(2000) is None and cfg.schedule()(2001) == 1.0
    with pytest.raises(ValueError, match="reweight.warmup_mode 'exact' is unknown; valid: temperature, uniform"):
        ReweightConfig(warmup_mode="exact").validate()
    why = ReweightConfig(warmup_steps=2000).warmup_warning(50)
    assert "reweight.warmup_steps = 2000" in why and "training.steps = 50" in why and "r = " in why
    assert "\n" not in why
    assert "uniform weights" in cfg.warmup_warning(2000)  # = the run: the strategy never applies either
    assert ReweightConfig(warmup_steps=49).warmup_warning(50) is None
    assert ReweightConfig(warmup_steps=0).warmup_warning(1) is None

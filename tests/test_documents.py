"""Tests of document-level samples: titan_rw.documents and the token-share prior of titan_rw.reweight.

Every expected value comes from an independent plain-Python / float64 computation written from the
formulas (fragments by a loop over positions, weights from the softmax of s / r + log pi, the cap by
bisection on lambda), never from the module's own output.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titan_rw import loss as loss_mod
from titan_rw.documents import (
    DEFAULT_MAX_DOCUMENTS,
    DEFAULT_MIN_DOCUMENT_TOKENS,
    IGNORE_INDEX,
    document_losses,
    document_weights,
    fragment_index,
    fragment_sums,
)
from titan_rw.reweight import cap_weights, max_weight_ratio, sample_weights

RANGE_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------
def ref_fragments(positions, max_documents):
    """(index [B][T], count [B]) by a loop: a fragment starts at column 0 and wherever position == 0."""
    index, count = [], []
    for row in positions.tolist():
        frag, idx = -1, []
        for t, p in enumerate(row):
            if t == 0 or p == 0:
                frag += 1
            idx.append(min(frag, max_documents - 1))
        index.append(idx)
        count.append(frag + 1)
    return index, count


def ref_document_losses(token_nll, labels, positions, max_documents):
    """(losses [B][F] float64, n_tokens [B][F]) by loops."""
    index, _ = ref_fragments(positions, max_documents)
    nll, lab = token_nll.double().tolist(), labels.tolist()
    sums = [[0.0] * max_documents for _ in lab]
    ns = [[0] * max_documents for _ in lab]
    for b in range(len(lab)):
        for t in range(len(lab[b])):
            if lab[b][t] != IGNORE_INDEX:
                sums[b][index[b][t]] += nll[b][t]
                ns[b][index[b][t]] += 1
    losses = [[s / n if n else 0.0 for s, n in zip(sr, nr)] for sr, nr in zip(sums, ns)]
    return losses, ns


def _score(h, strategy):
    return {"uniform": 0.0, "linupper": min(h + 1.0, 1.0), "quadratic": 1.0 - h * h, "extremes": abs(h)}[strategy]


def _project(logv, log_u):
    """KL projection w_d = min(lam v_d, u_d), sum 1, by bisection on log(lam) in float64."""

    def total(t):
        return math.fsum(math.exp(min(t + lv, lu)) for lv, lu in zip(logv, log_u))

    if total(0.0) >= 1.0 - 1e-15:
        return [math.exp(lv) for lv in logv]
    lo, hi = 0.0, max(lu - lv for lv, lu in zip(logv, log_u))
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < 1.0 else (lo, mid)
    t = 0.5 * (lo + hi)
    return [math.exp(min(t + lv, lu)) for lv, lu in zip(logv, log_u)]


def ref_prior_weights(losses, prior, strategy, r, cap=None, valid=None):
    """w_i = pi_i e^{s_i/r} / sum_j pi_j e^{s_j/r} over valid i (pi > 0, finite loss), float64."""
    n = len(losses)
    keep = [
        i for i in range(n)
        if math.isfinite(losses[i]) and prior[i] > 0 and (valid is None or valid[i])
    ]
    out = [0.0] * n
    if not keep:
        return out
    f = [float(losses[i]) for i in keep]
    ptot = math.fsum(prior[i] for i in keep)
    lp = [math.log(prior[i] / ptot) for i in keep]
    if strategy == "dro_kl":
        s = f
    else:
        lo, hi = min(f), max(f)
        h = [0.0] * len(f) if hi - lo <= RANGE_EPS else [2 * (x - lo) / (hi - lo) - 1 for x in f]
        s = [_score(x, strategy) for x in h]
    z = [si / r + l for si, l in zip(s, lp)]
    m = max(z)
    lse = m + math.log(math.fsum(math.exp(x - m) for x in z))
    logv = [x - lse for x in z]
    w = [math.exp(x) for x in logv] if cap is None else _project(logv, [math.log(cap) + l for l in lp])
    for i, wi in zip(keep, w):
        out[i] = wi
    return out


def ref_document_weights(losses, n_tokens, strategy, r, cap=None, min_tokens=32, merged=None):
    """The rule of titan_rw.documents in float64: short fragments keep pi, long ones share the rest."""
    n = len(losses)
    present = [n_tokens[i] > 0 and math.isfinite(losses[i]) for i in range(n)]
    N = sum(n_tokens[i] for i in range(n) if present[i])
    pi = [n_tokens[i] / N if present[i] else 0.0 for i in range(n)]
    short = [present[i] and (n_tokens[i] < min_tokens or (merged is not None and merged[i])) for i in range(n)]
    long = [present[i] and not short[i] for i in range(n)]
    P = math.fsum(pi[i] for i in range(n) if long[i])
    v = ref_prior_weights(losses, pi, strategy, r, cap=cap, valid=long)
    return [pi[i] if short[i] else P * v[i] for i in range(n)], pi


def make_positions(rows, T):
    """positions [B, T] from a list of fragment lengths per row (the first may be a continuation:
    it starts at an arbitrary offset but the row resets it to 0, as the loader does)."""
    out = []
    for lengths in rows:
        assert sum(lengths) == T
        out.append([p for n in lengths for p in range(n)])
    return torch.tensor(out, dtype=torch.int64)


def random_rows(rng, B, T, mean_len):
    rows = []
    for _ in range(B):
        lengths, left = [], T
        while left:
            n = min(left, max(1, int(rng.expovariate(1.0 / mean_len))))
            lengths.append(n)
            left -= n
        rows.append(lengths)
    return rows


# ----------------------------------------------------------------------------------------------
# Fragments and their losses
# ----------------------------------------------------------------------------------------------
def test_ignore_index_matches_loss_module():
    assert IGNORE_INDEX == loss_mod.IGNORE_INDEX


def test_defaults():
    assert DEFAULT_MAX_DOCUMENTS == 64 and DEFAULT_MIN_DOCUMENT_TOKENS == 32


def _cases():
    T = 12
    rows = [
        [12],  # one document
        [3, 4, 5],
        [1] * 12,  # 12 fragments: overflow for F <= 11
        [5, 7],  # starts mid-document (a continuation of 5 tokens, then a document)
        [2, 1, 1, 1, 1, 6],
    ]
    positions = make_positions(rows, T)
    # a continuation that the loader writes as positions counting from 0 anyway, then padding row
    positions = torch.cat([positions, torch.arange(T)[None]], 0)
    labels = torch.randint(0, 50, positions.shape)
    labels[5] = IGNORE_INDEX  # a padding row (all labels masked)
    labels[1, 9:] = IGNORE_INDEX  # a padded tail
    return positions, labels


@pytest.mark.parametrize("F_", [1, 2, 4, 11, 64])
def test_fragment_index_matches_loop(F_):
    positions, _ = _cases()
    index, count, overflow = fragment_index(positions, F_)
    ref_index, ref_count = ref_fragments(positions, F_)
    assert index.dtype == torch.int64 and count.dtype == torch.int64 and overflow.dtype == torch.bool
    assert index.tolist() == ref_index
    assert count.tolist() == ref_count == [1, 3, 12, 2, 6, 1]
    assert overflow.tolist() == [c > F_ for c in ref_count]
    assert int(index.min()) >= 0 and int(index.max()) <= F_ - 1


def test_fragment_index_random_and_column_zero():
    rng = random.Random(0)
    rows = random_rows(rng, 16, 64, 10)
    positions = make_positions(rows, 64)
    positions[3, 0] = 17  # a row must start a fragment at column 0 whatever its position says
    for F_ in (3, 8, 64):
        index, count, overflow = fragment_index(positions, F_)
        ref_index, ref_count = ref_fragments(positions, F_)
        assert index.tolist() == ref_index and count.tolist() == ref_count
        assert overflow.tolist() == [c > F_ for c in ref_count]


def test_fragment_index_rejects_bad_max_documents():
    with pytest.raises(ValueError, match="max_documents"):
        fragment_index(torch.zeros(2, 3, dtype=torch.int64), 0)


def test_fragment_sums_keeps_autograd():
    positions = make_positions([[2, 3], [5]], 5)
    index, _, _ = fragment_index(positions, 3)
    v = torch.arange(10.0).view(2, 5).requires_grad_()
    s = fragment_sums(v, index, 3)
    assert s.tolist() == [[1.0, 9.0, 0.0], [35.0, 0.0, 0.0]]
    (s * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    assert v.grad.tolist() == [[1, 1, 2, 2, 2], [4, 4, 4, 4, 4]]


@pytest.mark.parametrize("F_", [2, 4, 64])
def test_document_losses_match_loop(F_):
    positions, labels = _cases()
    nll = torch.rand(positions.shape, dtype=torch.float32) * 5
    nll[labels == IGNORE_INDEX] = float("nan")  # padding must not leak into any fragment
    nll.requires_grad_()
    d = document_losses(nll, labels, positions, F_)
    ref_losses, ref_n = ref_document_losses(torch.nan_to_num(nll.detach()), labels, positions, F_)
    assert d.losses.dtype == torch.float32 and d.n_tokens.dtype == torch.int64
    assert d.losses.shape == (6, F_)
    np.testing.assert_allclose(d.losses.detach().double().numpy(), np.array(ref_losses), rtol=1e-6, atol=1e-7)
    assert d.n_tokens.tolist() == ref_n
    _, ref_count = ref_fragments(positions, F_)
    assert d.overflow.tolist() == [c > F_ for c in ref_count]
    assert d.count.tolist() == ref_count
    assert d.merged.tolist() == [[c > F_ and j == F_ - 1 for j in range(F_)] for c in ref_count]
    assert d.n_tokens[5].sum() == 0 and torch.all(d.losses[5] == 0)  # padding row: all slots empty
    # autograd: d sum_d f_d / d nll_t = 1 / n_d on valid tokens, 0 on padding
    d.losses.sum().backward()
    index, _ = ref_fragments(positions, F_)
    g = nll.grad.tolist()
    for b in range(6):
        for t in range(12):
            want = 0.0 if labels[b, t] == IGNORE_INDEX else 1.0 / ref_n[b][index[b][t]]
            assert g[b][t] == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The token-share prior in sample_weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["uniform", "linupper", "quadratic", "extremes", "dro_kl"])
@pytest.mark.parametrize("cap", [None, 1.0, 1.5, 2.0])
def test_sample_weights_prior_matches_reference(strategy, cap):
    rng = random.Random(f"{strategy}-{cap}")
    for trial in range(6):
        n = rng.randint(1, 40)
        # float32-representable inputs: the module computes in float32, the reference in float64
        losses = [float(np.float32(rng.uniform(1.0, 6.0))) for _ in range(n)]
        prior = [float(np.float32(rng.choice([0.0, 1e-8, 1.0, 7.0, 300.0]) * rng.random())) for _ in range(n)]
        prior[0] = max(prior[0], 0.5)
        if n > 3:
            losses[1] = float("nan")
        r = rng.choice([0.1, 0.5, 1.0, 3.0])
        w = sample_weights(torch.tensor(losses), strategy, r, cap=cap, prior=torch.tensor(prior))
        ref = ref_prior_weights(losses, prior, strategy, r, cap=cap)
        assert w.dtype == torch.float32
        np.testing.assert_allclose(w.double().numpy(), ref, rtol=1e-5, atol=1e-7)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
        keep = [i for i in range(n) if math.isfinite(losses[i]) and prior[i] > 0]
        ptot = sum(prior[i] for i in keep)
        assert all(float(w[i]) == 0.0 for i in range(n) if i not in keep)
        if strategy == "uniform":
            # rtol 1e-5: priors down to 1e-11 here, float32 exp(log pi) has ~|log pi| * 6e-8 relative error
            np.testing.assert_allclose(w.double().numpy()[keep], [prior[i] / ptot for i in keep], rtol=1e-5)
        if cap is not None:
            for i in keep:
                assert float(w[i]) <= cap * prior[i] / ptot * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize("cap", [None, 1.0, 2.0])
@pytest.mark.parametrize("strategy", ["linupper", "extremes", "dro_kl"])
def test_constant_prior_equals_row_formula(strategy, cap):
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(128, generator=g) * 4
    losses[7] = 30.0  # one high loss: linupper breaks 2/b without the cap
    valid = torch.rand(128, generator=g) > 0.1
    base = sample_weights(losses, strategy, 1.0, cap=cap, valid=valid)
    w = sample_weights(losses, strategy, 1.0, cap=cap, valid=valid, prior=torch.full((128,), 3.0))
    np.testing.assert_allclose(w.numpy(), base.numpy(), rtol=1e-5, atol=1e-8)


def test_cap_weights_prior_extreme_logs():
    # Weights and priors across hundreds of orders of magnitude: the log-space scan still projects.
    log_w = torch.tensor([0.0, -1.0, -200.0, -400.0, -5.0, -float("inf")])
    log_prior = torch.tensor([-300.0, -0.5, 0.0, -2.0, -100.0, 0.0])
    valid = torch.tensor([True, True, True, True, True, False])
    w = cap_weights(log_w - torch.logsumexp(log_w[:5], 0), 2.0, valid, log_prior=log_prior)
    lw = (log_w - torch.logsumexp(log_w[:5], 0)).double().tolist()[:5]
    lp = log_prior.double().tolist()[:5]
    m = max(lp)
    lp_n = [x - (m + math.log(math.fsum(math.exp(y - m) for y in lp))) for x in lp]
    ref = _project(lw, [math.log(2.0) + x for x in lp_n])
    np.testing.assert_allclose(w.double().numpy()[:5], ref, rtol=1e-5, atol=1e-30)
    assert float(w[5]) == 0.0 and float(w.sum()) == pytest.approx(1.0, abs=1e-6)


def test_max_weight_ratio():
    w = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    prior = torch.tensor([2.0, 1.0, 1.0, 4.0, 0.0]) / 8  # an empty slot (pi = 0) counts nothing
    assert float(max_weight_ratio(w, prior)) == pytest.approx(0.3 / (1 / 8))
    w = torch.tensor([0.5, 0.0, 0.2, 0.3, 7.0])  # a weight where pi = 0 (no sample there) is not a ratio
    assert float(max_weight_ratio(w, torch.tensor([2.0, 0.0, 1.0, 4.0, 0.0]) / 7)) == pytest.approx(0.5 / (2 / 7))
    # With a uniform prior it is b * max w, Theorem 1's bound 2/b read as a ratio bound of 2.
    w = torch.tensor([0.1, 0.2, 0.7])
    assert float(max_weight_ratio(w, torch.ones(3) / 3)) == pytest.approx(2.1)


# ----------------------------------------------------------------------------------------------
# Document weights
# ----------------------------------------------------------------------------------------------
def _doc_batch(seed, B=6, T=96, mean_len=20, F_=8):
    rng = random.Random(seed)
    positions = make_positions(random_rows(rng, B, T, mean_len), T)
    labels = torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(seed))
    labels[-1, T // 2 :] = IGNORE_INDEX  # padded tail of the last row
    nll = torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 1)) * 6
    d = document_losses(nll, labels, positions, F_)
    return nll, labels, positions, d


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_tokens", [0, 8, 32])
def test_uniform_document_weights_are_token_share(seed, min_tokens):
    nll, labels, positions, d = _doc_batch(seed)
    f, n, m = d.losses.flatten(), d.n_tokens.flatten(), d.merged.flatten()
    w, pi = document_weights(f, n, "uniform", 1.0, min_tokens=min_tokens, merged=m)
    N = int((labels != IGNORE_INDEX).sum())
    want = n.double() / N
    np.testing.assert_allclose(w.double().numpy(), want.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(pi.double().numpy(), want.numpy(), rtol=1e-6, atol=0)
    token_mean = float(nll.double()[labels != IGNORE_INDEX].mean())
    assert float((w.double() * f.detach().double()).sum()) == pytest.approx(token_mean, rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "dro_kl"])
@pytest.mark.parametrize("min_tokens", [1, 12])
def test_document_weights_match_reference(seed, strategy, min_tokens):
    nll, labels, positions, d = _doc_batch(seed)
    f, n, m = d.losses.detach().flatten(), d.n_tokens.flatten(), d.merged.flatten()
    r = 0.3 if strategy != "dro_kl" else 2.0
    w, pi = document_weights(f, n, strategy, r, min_tokens=min_tokens, merged=m)
    ref, ref_pi = ref_document_weights(f.double().tolist(), n.tolist(), strategy, r, min_tokens=min_tokens, merged=m.tolist())
    np.testing.assert_allclose(w.double().numpy(), ref, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(pi.double().numpy(), ref_pi, rtol=1e-6)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    short = [(k > 0 and (k < min_tokens or mm)) for k, mm in zip(n.tolist(), m.tolist())]
    for i in range(len(short)):  # short and merged fragments keep exactly their token share
        if short[i]:
            assert float(w[i]) == pytest.approx(ref_pi[i], rel=1e-6)


def test_linupper_by_hand():
    # Three documents of 40, 40, 80 tokens and a 4-token continuation; min_tokens 32.
    f = torch.tensor([2.0, 3.0, 4.0, 9.0])
    n = torch.tensor([40, 40, 80, 4])
    w, pi = document_weights(f, n, "linupper", 1.0, min_tokens=32)
    N = 164.0
    # long: f in {2, 3, 4} -> h = -1, 0, 1 -> s = 0, 1, 1 ; short fragment keeps 4/164
    logits = [math.log(40 / N) + 0.0, math.log(40 / N) + 1.0, math.log(80 / N) + 1.0]
    z = math.fsum(math.exp(x) for x in logits)
    P = 160 / N
    ref = [P * math.exp(x) / z for x in logits] + [4 / N]
    np.testing.assert_allclose(w.double().numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(pi.double().numpy(), [40 / N, 40 / N, 80 / N, 4 / N], rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("cap", [1.0, 1.3, 2.0])
def test_document_weights_cap(seed, cap):
    nll, labels, positions, d = _doc_batch(seed, mean_len=30)
    f, n, m = d.losses.detach().flatten().clone(), d.n_tokens.flatten(), d.merged.flatten()
    # one very high loss on the smallest long fragment, so that linupper at a low temperature needs the cap
    long = [i for i, (k, mm) in enumerate(zip(n.tolist(), m.tolist())) if k >= 8 and not mm]
    f[min(long, key=lambda i: n[i])] = 40.0
    w, pi = document_weights(f, n, "linupper", 0.05, cap=cap, min_tokens=8, merged=m)
    ref, ref_pi = ref_document_weights(f.double().tolist(), n.tolist(), "linupper", 0.05, cap=cap, min_tokens=8, merged=m.tolist())
    np.testing.assert_allclose(w.double().numpy(), ref, rtol=1e-5, atol=1e-8)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w <= cap * pi + 1e-6)
    assert float(max_weight_ratio(w, pi)) <= cap + 1e-5
    # without the cap the bound is broken here (else this test proves nothing)
    w0, _ = document_weights(f, n, "linupper", 0.05, min_tokens=8, merged=m)
    assert float(max_weight_ratio(w0, pi)) > cap + 1e-3


@pytest.mark.parametrize("strategy", ["uniform", "linupper", "extremes", "dro_kl"])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_one_document_per_row_equals_row_weights(strategy, cap):
    B, T = 16, 48
    g = torch.Generator().manual_seed(11)
    # multiples of 1/8: every sum is exact in float32, so row and fragment losses are the same numbers
    nll = torch.randint(0, 40, (B, T), generator=g).float() / 8
    nll[3] += 3.0
    labels = torch.randint(0, 100, (B, T), generator=g)
    positions = torch.arange(T).repeat(B, 1)
    d = document_losses(nll, labels, positions, 4)
    row_losses = nll.double().sum(dim=1).float() / T
    assert torch.equal(d.losses[:, 0], row_losses)
    w, _ = document_weights(d.losses.flatten(), d.n_tokens.flatten(), strategy, 0.2, cap=cap, merged=d.merged.flatten())
    w = w.view(B, 4)
    assert torch.all(w[:, 1:] == 0)
    base = sample_weights(row_losses, strategy, 0.2, cap=cap)
    np.testing.assert_allclose(w[:, 0].numpy(), base.numpy(), rtol=1e-6, atol=1e-9)


def test_non_finite_and_empty_fragments():
    f = torch.tensor([2.0, float("nan"), 3.0, float("inf"), 5.0, 0.0])
    n = torch.tensor([50, 60, 70, 40, 80, 0])
    for strategy, cap in [("uniform", None), ("linupper", None), ("linupper", 1.5), ("dro_kl", 2.0)]:
        w, pi = document_weights(f, n, strategy, 0.5, cap=cap)
        assert torch.all(torch.isfinite(w)) and torch.all(torch.isfinite(pi))
        assert w[1] == 0 and w[3] == 0 and w[5] == 0 and pi[1] == 0 and pi[3] == 0 and pi[5] == 0
        np.testing.assert_allclose(pi[[0, 2, 4]].numpy(), [50 / 200, 70 / 200, 80 / 200], rtol=1e-6)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
        ref, _ = ref_document_weights(f.double().tolist(), n.tolist(), strategy, 0.5, cap=cap)
        np.testing.assert_allclose(w.double().numpy(), ref, rtol=1e-5, atol=1e-9)


def test_all_short_or_nothing():
    f = torch.tensor([2.0, 3.0, 4.0])
    w, pi = document_weights(f, torch.tensor([5, 10, 25]), "linupper", 1.0)  # all short at 32
    np.testing.assert_allclose(w.numpy(), [0.125, 0.25, 0.625], rtol=1e-6)
    w, pi = document_weights(f, torch.tensor([0, 0, 0]), "linupper", 1.0, cap=2.0)
    assert torch.all(w == 0) and torch.all(pi == 0)


def test_document_weights_bad_arguments():
    f, n = torch.tensor([1.0, 2.0]), torch.tensor([40, 40])
    with pytest.raises(ValueError, match="min_document_tokens"):
        document_weights(f, n, "linupper", 1.0, min_tokens=-1)
    with pytest.raises(ValueError, match="strategy"):
        document_weights(f, n, "nope", 1.0)
    with pytest.raises(ValueError, match="1-D"):
        document_weights(f.view(1, 2), n.view(1, 2), "linupper", 1.0)


# ----------------------------------------------------------------------------------------------
# Gradients through titan_rw.loss.per_token_nll
# ----------------------------------------------------------------------------------------------
def _lm(seed, B=4, T=40, D=8, V=23):
    torch.manual_seed(seed)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, T, D, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[-1, 25:] = IGNORE_INDEX
    rng = random.Random(seed)
    positions = make_positions(random_rows(rng, B, T, 9), T)
    return head, hidden, labels, positions


def _grads(loss, head, hidden):
    gw, gh = torch.autograd.grad(loss, [head.weight, hidden])
    return gw.double(), gh.double()


@pytest.mark.parametrize("seed", range(3))
def test_uniform_gradient_is_token_mean_gradient(seed):
    head, hidden, labels, positions = _lm(seed)
    token_nll = loss_mod.per_token_nll(head, hidden, labels, num_chunks=3)
    d = document_losses(token_nll, labels, positions, 5)  # some rows overflow at 5
    w, _ = document_weights(d.losses.flatten(), d.n_tokens.flatten(), "uniform", 1.0, merged=d.merged.flatten())
    gw, gh = _grads((w * d.losses.flatten()).sum(), head, hidden)
    # independent: float64 cross-entropy, mean over all valid tokens
    W64 = head.weight.detach().double().requires_grad_()
    h64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ W64.t()).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    rw, rh = torch.autograd.grad(ref, [W64, h64])
    np.testing.assert_allclose(gw.numpy(), rw.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(gh.numpy(), rh.numpy(), atol=1e-6, rtol=0)
    assert float(gw.abs().max()) > 1e-3  # not a vacuous match


@pytest.mark.parametrize("seed", range(3))
def test_linupper_gradient_is_weighted_document_gradient(seed):
    head, hidden, labels, positions = _lm(seed)
    F_, r = 6, 0.2
    token_nll = loss_mod.per_token_nll(head, hidden, labels, num_chunks=2)
    d = document_losses(token_nll, labels, positions, F_)
    w, _ = document_weights(d.losses.flatten(), d.n_tokens.flatten(), "linupper", r, min_tokens=4, merged=d.merged.flatten())
    assert not w.requires_grad  # weights are detached: the gradient is sum_d w_d grad f_d
    gw, gh = _grads((w * d.losses.flatten()).sum(), head, hidden)

    # independent: fragments by loop, f_d by float64 cross-entropy, w_d by the float64 formula
    W64 = head.weight.detach().double().requires_grad_()
    h64 = hidden.detach().double().requires_grad_()
    tok = F.cross_entropy((h64 @ W64.t()).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    tok = tok.view(labels.shape)
    index, count = ref_fragments(positions, F_)
    frags = []  # (f_d as a float64 autograd scalar, n_d, merged)
    for b in range(labels.shape[0]):
        for j in range(F_):
            ts = [t for t in range(labels.shape[1]) if index[b][t] == j and labels[b, t] != IGNORE_INDEX]
            f_d = tok[b, ts].mean() if ts else torch.zeros((), dtype=torch.float64)
            frags.append((f_d, len(ts), count[b] > F_ and j == F_ - 1))
    ref_w, _ = ref_document_weights(
        [float(x[0].detach()) for x in frags], [x[1] for x in frags], "linupper", r, min_tokens=4, merged=[x[2] for x in frags]
    )
    assert max(ref_w) > 1.5 * min(x for x in ref_w if x > 0)  # weights really differ from uniform
    ref = sum(wd * fd for wd, (fd, _, _) in zip(ref_w, frags) if wd > 0)
    rw, rh = torch.autograd.grad(ref, [W64, h64])
    np.testing.assert_allclose(gw.numpy(), rw.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(gh.numpy(), rh.numpy(), atol=1e-6, rtol=0)

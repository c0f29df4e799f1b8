"""Per-sample loss, DP gather and weighted loss (titan_rw.loss) on real gloo process groups."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from memtrack import peak_bytes
from titan_rw.loss import IGNORE_INDEX, ReweightSettings, per_sample_loss, reweighted_loss
from titan_rw.reweight import sample_weights


def _naive_per_sample(lm_head, hidden, labels):
    v = lm_head.weight.shape[0]
    tok = F.cross_entropy(
        lm_head(hidden).reshape(-1, v).to(torch.promote_types(hidden.dtype, torch.float32)), labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).view(labels.shape)
    n = (labels != IGNORE_INDEX).sum(1)
    return tok.sum(1) / n.clamp(min=1)


@pytest.mark.parametrize("num_chunks", [1, 3, 8, 1000])
def test_per_sample_loss_matches_cross_entropy_and_its_gradients(num_chunks):
    torch.manual_seed(0)
    b, t, d, v = 4, 9, 16, 37
    lm = torch.nn.Linear(d, v, bias=False).double()
    hidden = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    labels[1, 4:] = IGNORE_INDEX  # a short sample
    labels[3, :] = IGNORE_INDEX  # a sample with no valid token
    losses, n_valid = per_sample_loss(lm, hidden, labels, num_chunks=num_chunks)
    ref = _naive_per_sample(lm, hidden, labels)
    assert n_valid.tolist() == [t, 4, t, 0]
    torch.testing.assert_close(losses.double(), ref, rtol=1e-6, atol=1e-6)
    assert losses[3] == 0

    w = torch.tensor([0.1, 0.5, 0.4, 0.0], dtype=torch.float64)
    (losses.double() * w).sum().backward()
    got_h, got_w = hidden.grad.clone(), lm.weight.grad.clone()
    hidden.grad = lm.weight.grad = None
    (ref * w).sum().backward()
    torch.testing.assert_close(got_h, hidden.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_w, lm.weight.grad, rtol=1e-6, atol=1e-9)


def test_per_sample_loss_bf16_close_to_fp32():
    torch.manual_seed(1)
    lm = torch.nn.Linear(32, 64, bias=False)
    hidden = torch.randn(2, 16, 32)
    labels = torch.randint(0, 64, (2, 16))
    ref, _ = per_sample_loss(lm, hidden, labels)
    got, _ = per_sample_loss(lm.to(torch.bfloat16), hidden.to(torch.bfloat16), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_per_sample_loss_memory_stays_at_chunked_level():
    """Peak live bytes: near a chunked mean-CE loop (TorchTitan's way), far below full logits."""
    torch.manual_seed(2)
    b, t, d, v, chunks = 4, 256, 64, 4096, 8
    lm = torch.nn.Linear(d, v, bias=False)
    hidden = torch.randn(b, t, d, requires_grad=True)
    labels = torch.randint(0, v, (b, t))

    def ours():
        losses, _ = per_sample_loss(lm, hidden, labels, num_chunks=chunks)
        losses.sum().backward()

    def chunked_mean():  # per-chunk forward + immediate backward, as TorchTitan's ChunkedLossWrapper
        for h, y in zip(torch.split(hidden.detach(), t // chunks, 1), torch.split(labels, t // chunks, 1)):
            h = h.detach().requires_grad_()
            F.cross_entropy(lm(h).reshape(-1, v), y.reshape(-1), reduction="sum").backward()

    def naive():
        _naive_per_sample(lm, hidden, labels).sum().backward()

    full_logits = b * t * v * 4
    p_ours, p_chunked, p_naive = peak_bytes(ours), peak_bytes(chunked_mean), peak_bytes(naive)
    assert p_naive > 2 * full_logits
    assert p_ours < 0.6 * full_logits, (p_ours, full_logits)
    assert p_ours <= 1.25 * p_chunked, (p_ours, p_chunked)


def test_reweighted_loss_single_process_weights_and_nan():
    losses = torch.tensor([1.0, 2.0, float("nan"), 4.0], requires_grad=True)
    loss, stats = reweighted_loss(losses, torch.tensor(1.0), ReweightSettings("linupper"))
    ref = sample_weights(losses.detach(), "linupper", 1.0)
    torch.testing.assert_close(stats.weights, ref)
    assert stats.weights[2] == 0 and int(stats.b) == 3
    assert torch.isfinite(loss)
    loss.backward()
    assert losses.grad[2] == 0
    torch.testing.assert_close(losses.grad, ref)
    torch.testing.assert_close(stats.mean_loss, torch.tensor(7.0 / 3))


# ---- two real gloo ranks ---------------------------------------------------------------

B_LOCAL, T, D, V = 3, 8, 12, 29


def _global_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, D, generator=g)
    head = torch.randn(V, D, generator=g) * 0.5
    tokens = torch.randint(0, V, (2 * B_LOCAL, T + 1), generator=g)
    return emb, head, tokens


def _losses(emb, head_w, tokens):
    lm = torch.nn.Linear(D, V, bias=False)
    lm.weight = torch.nn.Parameter(head_w)
    hidden = torch.tanh(F.embedding(tokens[:, :-1], emb))
    labels = tokens[:, 1:].clone()
    labels[labels % 7 == 0] = IGNORE_INDEX  # ragged valid counts, the same rows on any rank
    return per_sample_loss(lm, hidden, labels, num_chunks=3)[0], lm.weight


def _worker(rank, port, strategy, cap, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        emb, head, tokens = _global_batch()
        mine = tokens[rank * B_LOCAL : (rank + 1) * B_LOCAL]
        emb = emb.clone().requires_grad_()
        losses, head_w = _losses(emb, head.clone(), mine)
        temp = torch.tensor(0.7)
        settings = ReweightSettings(strategy, cap=cap, group=dist.group.WORLD, dp_rank=rank, dp_size=2)
        loss, stats = reweighted_loss(losses, temp, settings)
        loss.backward()
        grads = torch.cat([emb.grad.flatten(), head_w.grad.flatten()])
        dist.all_reduce(grads)  # FSDP in TorchTitan sums gradients over DP ranks
        step = torch.compile(reweighted_loss, fullgraph=True)
        c_loss, c_stats = step(losses.detach(), temp, settings)
        if rank == 0:
            torch.save((grads, stats.weights.clone(), stats.losses.clone(), (c_loss - loss).abs().item(),
                     (c_stats.weights - stats.weights).abs().max().item()), out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,cap", [("linupper", None), ("quadratic", 2.0)])
def test_two_rank_gradients_equal_global_reference(strategy, cap, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), strategy, cap, str(out)), nprocs=2, join=True)
    grads, weights, gathered, d_loss, d_w = torch.load(out)

    emb, head, tokens = _global_batch()
    emb = emb.clone().requires_grad_()
    losses, head_w = _losses(emb, head.clone(), tokens)
    torch.testing.assert_close(gathered, losses.detach())  # rank order = global order
    w = sample_weights(losses.detach(), strategy, 0.7, cap=cap)
    torch.testing.assert_close(weights, w)
    (w * losses).sum().backward()
    torch.testing.assert_close(grads, torch.cat([emb.grad.flatten(), head_w.grad.flatten()]), rtol=1e-5, atol=1e-6)
    assert d_loss < 1e-6 and d_w < 1e-7  # compiled (fullgraph) step == eager

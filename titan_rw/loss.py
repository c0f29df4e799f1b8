"""Per-sample loss, the data-parallel gather and the weighted loss.

The one place of the training step that talks to process groups. The math lives in
`titan_rw.reweight`; this module only feeds it the gathered losses and hands back this
rank's share of  sum_i w_i f_i  (Alg. 1 line 8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torchtitan.components.loss import IGNORE_INDEX

from titan_rw.documents import DocumentLosses, document_losses, document_weights
from titan_rw.reweight import max_weight_ratio, sample_weights

# Functional (traceable) all-gather: `all_gather_single` from torch 2.13, its older name before.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class _ChunkedTokenNLL(torch.autograd.Function):
    """Per-token NLL of  hidden @ weight.T  without ever holding all [N, V] logits.

    Forward walks the N tokens in chunks and keeps only each token's log-sum-exp. Backward
    recomputes one chunk's logits at a time and applies the upstream per-token gradient
    (for the weighted loss that is w_i / n_i on every valid token of sample i), so the
    sample weights *are* the upstream gradient and no [B, T, V] tensor is ever stored.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for bf16/fp32 models
        nll = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty_like(nll)
        safe = labels.clamp(min=0)
        for s in range(0, n, chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).to(acc)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[s : s + chunk, None]).squeeze(1)
            nll[s : s + chunk] = lse[s : s + chunk] - picked
        nll = torch.where(labels == IGNORE_INDEX, 0.0, nll)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        acc = lse.dtype
        grad_nll = torch.where(labels == IGNORE_INDEX, 0.0, grad_nll.to(acc))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        safe = labels.clamp(min=0)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            # d nll / d logits = softmax - onehot, scaled by the upstream gradient
            g = torch.exp((h @ weight.t()).to(acc) - lse[s : s + chunk, None])
            g.scatter_add_(1, safe[s : s + chunk, None], torch.full_like(g[:, :1], -1.0))
            g.mul_(grad_nll[s : s + chunk, None])
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[s : s + chunk] = g @ weight
            if need_w:
                grad_w.addmm_(g.t().to(acc), h.to(acc))
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None


def _token_nll_forward(lm_head: nn.Module, labels: torch.Tensor, num_chunks: int):
    """A forward for `lm_head` that returns per-token NLL instead of logits."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("per_sample_loss supports a bias-free output projection (Llama's)")
        b, t, d = hidden.shape
        flat = hidden.reshape(b * t, d)
        chunk = max(1, -(-flat.shape[0] // num_chunks))
        return _ChunkedTokenNLL.apply(flat, lm_head.weight, labels.reshape(-1), chunk).view(b, t)

    return forward


def per_token_nll(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, num_chunks: int = 8) -> torch.Tensor:
    """NLL of every token [B, T] (float32, 0 where the label is IGNORE_INDEX), from the final hidden
    states [B, T, D], with autograd to `hidden` and `lm_head.weight`. The projection runs through
    one call of `lm_head`, so FSDP2 all-gathers its weight once and reduce-scatters its gradient
    once, and the logits exist one chunk at a time in forward and backward (docs/design.md §2)."""
    plain = lm_head.forward
    lm_head.forward = _token_nll_forward(lm_head, labels, num_chunks)
    try:
        return lm_head(hidden)
    finally:
        lm_head.forward = plain


def per_sample_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_chunks: int = 8,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token NLL of each sample (row), from the final hidden states [B, T, D].

    Returns (losses [B] float32 with autograd to `hidden` and `lm_head.weight`, valid-token
    counts [B]); see `per_token_nll` (docs/design.md §2, step 1).
    """
    if ignore_index != IGNORE_INDEX:
        labels = torch.where(labels == ignore_index, IGNORE_INDEX, labels)
    token_nll = per_token_nll(lm_head, hidden, labels, num_chunks=num_chunks)
    n_valid = (labels != IGNORE_INDEX).sum(dim=1)
    return token_nll.sum(dim=1) / n_valid.clamp(min=1), n_valid


def per_document_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    *,
    max_documents_per_row: int,
    num_chunks: int = 8,
) -> DocumentLosses:
    """Mean token NLL of every document fragment of every row (slots [B, F]), from the same
    per-token NLL as `per_sample_loss` (granularity = "document", titan_rw.documents)."""
    token_nll = per_token_nll(lm_head, hidden, labels, num_chunks=num_chunks)
    return document_losses(token_nll, labels, positions, max_documents_per_row)


@dataclass
class WeightStats:
    """Detached device tensors of one reweighting group, for logging at the interval."""

    losses: torch.Tensor  # [b] gathered per-sample losses, DP-rank order
    weights: torch.Tensor  # [b] their weights (0 for invalid samples)
    valid: torch.Tensor  # [b] bool
    b: torch.Tensor  # number of valid samples (the b of the 2/b bound)
    max_weight: torch.Tensor
    weighted_loss: torch.Tensor  # sum_i w_i f_i over the group
    mean_loss: torch.Tensor  # unweighted mean over valid samples (rows) / token mean (documents)
    # granularity = "document" only (None for rows, whose uniform weight is 1/b):
    prior: torch.Tensor | None = None  # [b] each fragment's uniform weight pi_d = n_d / N
    max_ratio: torch.Tensor | None = None  # max_d w_d / pi_d (bound: c; for rows it is b * max w)
    overflow_rows: torch.Tensor | None = None  # rows with more fragments than slots (tail merged)
    rank_weights: torch.Tensor | None = None  # [k·n] this rank's slice (micro-batch, then sample): what its loss uses

    @classmethod
    def of(cls, losses: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> "WeightStats":
        b = valid.sum()
        clean = torch.where(valid, losses, 0.0)
        return cls(losses=losses, weights=weights, valid=valid, b=b, max_weight=weights.max(),
                   weighted_loss=(weights * clean).sum(), mean_loss=clean.sum() / b.clamp(min=1))

    @classmethod
    def of_documents(cls, losses, weights, valid, prior, merged) -> "WeightStats":
        st = cls.of(losses, weights, valid)
        st.mean_loss = (prior * torch.where(valid, losses, 0.0)).sum()  # the plain token-mean loss
        st.prior = prior
        st.max_ratio = max_weight_ratio(weights, prior)
        st.overflow_rows = merged.sum()  # an overflow row has exactly one merged slot
        return st


def gather_losses(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather a 1-D tensor over the data-parallel group, in group-rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    return funcol.wait_tensor(_all_gather(local.contiguous(), gather_dim=0, group=group))


def gather_group(columns: list[torch.Tensor], group: dist.ProcessGroup | None, dp_size: int) -> torch.Tensor:
    """One all-gather of this rank's per-sample columns, each [k, n] (k micro-batches of n samples),
    over the data-parallel group → [c, k·dp·n] in the group's order: micro-batch j, then DP rank,
    then sample (what a 1-rank run with dp·n samples per micro-batch would see)."""
    c, k, n = len(columns), columns[0].shape[0], columns[0].shape[1]
    everyone = gather_losses(torch.stack(columns).reshape(-1), group)  # one collective
    return everyone.view(dp_size, c, k, n).permute(1, 2, 0, 3).reshape(c, k * dp_size * n)


@dataclass(frozen=True)
class ReweightSettings:
    """How one reweighting group's weights are computed and where its samples live: the strategy,
    cap and short-fragment threshold of `[reweight]`, and the data-parallel group whose ranks hold
    the group's samples. Built once per run (`of`); the uniform burn-in uses `uniform()`."""

    strategy: str
    cap: float | None = None
    min_document_tokens: int = 0  # granularity = "document": shorter fragments keep their token share
    group: dist.ProcessGroup | None = None  # the data-parallel ("batch") mesh's group; None: one rank
    dp_rank: int = 0  # this rank's place in `group` (its DP-mesh rank, never LOCAL_RANK)
    dp_size: int = 1

    @classmethod
    def of(cls, rw, group: dist.ProcessGroup | None = None, dp_rank: int = 0, dp_size: int = 1) -> "ReweightSettings":
        """From a `ReweightConfig` (titan_rw.reweight) and the data-parallel group."""
        return cls(strategy=rw.strategy, cap=rw.cap, min_document_tokens=rw.min_document_tokens,
                   group=group, dp_rank=dp_rank, dp_size=dp_size)

    def uniform(self) -> "ReweightSettings":
        """The same group with exactly uniform weights (strategy "uniform", no cap needed)."""
        return dataclasses.replace(self, strategy="uniform", cap=None)


def group_weights(
    local_losses: torch.Tensor,
    local_valid: torch.Tensor,
    temperature: torch.Tensor | float,
    settings: ReweightSettings,
    *,
    n_tokens: torch.Tensor | None = None,
    merged: torch.Tensor | None = None,
) -> tuple[torch.Tensor, WeightStats]:
    """The weights of one reweighting group spread over the DP ranks: this rank's [k, n] losses and
    valid masks → (this rank's weights [k, n], the group's WeightStats). pack → gather → Eq. (4)
    over the whole group → this rank's slice, by its DP-mesh rank (never LOCAL_RANK).

    Document fragments (granularity = "document") also pass their [k, n] token counts and merged
    flags, gathered in the same single collective; their weights are `document_weights`
    (w_d ∝ π_d e^{s_d/r}, short and merged fragments at π_d)."""
    strategy, cap, group, dp_rank, dp_size = (settings.strategy, settings.cap, settings.group,
                                              settings.dp_rank, settings.dp_size)
    f = local_losses.detach().float()
    ok = local_valid & torch.isfinite(f)
    k, n = f.shape
    if n_tokens is None:
        f_all, ok_all = gather_group([f, ok.float()], group, dp_size)
        ok_all = ok_all > 0.5
        w = sample_weights(f_all, strategy, temperature, cap=cap, valid=ok_all)  # Eq. (4)
        stats = WeightStats.of(f_all, w, ok_all)
    else:
        f_all, ok_all, n_all, merged_all = gather_group(
            [f, ok.float(), n_tokens.float(), merged.float()], group, dp_size)
        ok_all, merged_all = ok_all > 0.5, merged_all > 0.5
        n_all = torch.where(ok_all, n_all, 0.0)  # a non-finite fragment counts nowhere
        w, prior = document_weights(f_all, n_all, strategy, temperature, cap=cap,
                                    min_tokens=settings.min_document_tokens, merged=merged_all)
        stats = WeightStats.of_documents(f_all, w, ok_all, prior, merged_all)
    mine = w.view(k, dp_size, n)[:, dp_rank]
    stats.rank_weights = mine.reshape(-1)  # for the rows audit (fault.audit_rows)
    return mine, stats


def weighted_sum(weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i f_i (Alg. 1 line 8). A non-finite sample has weight 0, but 0 * nan is nan: select,
    don't multiply."""
    return torch.where(weights > 0, weights * losses.float(), 0.0).sum()


def reweighted_loss(
    local_losses: torch.Tensor,
    temperature: torch.Tensor | float,
    settings: ReweightSettings,
    *,
    valid: torch.Tensor | None = None,
    n_tokens: torch.Tensor | None = None,
    merged: torch.Tensor | None = None,
) -> tuple[torch.Tensor, WeightStats]:
    """This rank's share of  sum_i w_i f_i  over the whole data-parallel group (one micro-batch).

    TorchTitan's FSDP sums gradients across DP ranks (divide factor 1), so the sum over
    ranks of these local sums has exactly the gradient  sum_global w_i grad f_i.
    Document fragments: also their token counts and merged flags (see `group_weights`).
    """
    valid = torch.ones_like(local_losses, dtype=torch.bool) if valid is None else valid
    docs = {} if n_tokens is None else {"n_tokens": n_tokens[None], "merged": merged[None]}
    w, stats = group_weights(local_losses[None], valid[None], temperature, settings, **docs)
    return weighted_sum(w[0], local_losses), stats

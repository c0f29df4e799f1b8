"""Document-level samples: each document fragment inside a packed row is one sample of the reweighting.

Pure functions of tensors (no torch.distributed, no host sync): fragments from the loader's
`positions`, their mean token NLL f_d and token counts n_d, and their weights w_d on top of the
token-share prior pi_d = n_d / N (titan_rw.reweight.sample_weights with `prior`).

Formulas (N = sum of n_d over the non-empty fragments with a finite loss):

    pi_d = n_d / N                                    the plain token-mean loss's share of fragment d
    short = {n_d < min_tokens} or the merged overflow slot
    w_d  = pi_d                                       d short
    w_d  = (sum_{e long} pi_e) * softmax_long(s / r + log pi)_d   d long (s from min-max over long f)

so sum_d w_d = 1, `uniform` gives w = pi and sum_d w_d f_d = (sum of token NLL) / N, the plain
token-mean loss. The bound: rows have pi = 1/b and Theorem 1 asks w_i <= 2/b, i.e. w_i / pi_i <= 2;
for documents the same statement is w_d <= c pi_d (c = 2), no fragment more than c times its
token share. With `cap = c` the long fragments' weights are the KL projection w_d = min(lambda w_d,
c pi_d / P) of the softmax (P = sum_long pi), scaled by P: w_d <= c pi_d for every fragment (short
ones have ratio exactly 1 <= c). `titan_rw.reweight.max_weight_ratio` computes max_d w_d / pi_d, the
run's logged max_weight_ratio (`titan_rw.loss.WeightStats.of_documents`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchtitan.components.loss import IGNORE_INDEX  # the labels' padding value

from titan_rw.reweight import (  # noqa: F401  (the defaults are re-exported)
    DEFAULT_MAX_DOCUMENTS,
    DEFAULT_MIN_DOCUMENT_TOKENS,
    check_strategy,
    check_temperature,
    sample_weights,
)

# DEFAULT_MAX_DOCUMENTS and DEFAULT_MIN_DOCUMENT_TOKENS (the config keys' defaults, and why) live in
# titan_rw.reweight beside ReweightConfig.


def _check_max_documents_per_row(max_documents_per_row) -> None:
    if not isinstance(max_documents_per_row, int) or isinstance(max_documents_per_row, bool) or max_documents_per_row < 1:
        raise ValueError(f"reweight.max_documents_per_row must be an int >= 1, got {max_documents_per_row!r}")


def fragment_index(positions: torch.Tensor, max_documents_per_row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fragment of each input position of packed rows.

    positions [B, T] restart at 0 at every document start (and at each row's start). Fragment
    number = cumsum(positions == 0) - 1 along the row, column 0 always starting one; numbers past
    F - 1 (F = max_documents_per_row) are clamped to F - 1, i.e. the tail of a row with more than F
    fragments is merged into slot F - 1.

    Returns (index [B, T] int64 in [0, F), count [B] int64 the row's true number of fragments,
    overflow [B] bool = count > F). Device ops only.
    """
    _check_max_documents_per_row(max_documents_per_row)
    if positions.dim() != 2:
        raise ValueError(f"positions must be [B, T], got shape {tuple(positions.shape)}")
    t = torch.arange(positions.shape[1], device=positions.device)
    starts = (positions == 0) | (t == 0)  # a fragment starts here
    count = starts.sum(dim=1, dtype=torch.int64)
    index = (torch.cumsum(starts, dim=1, dtype=torch.int64) - 1).clamp(max=max_documents_per_row - 1)
    return index, count, count > max_documents_per_row


def fragment_sums(values: torch.Tensor, index: torch.Tensor, max_documents_per_row: int) -> torch.Tensor:
    """Per-fragment sums [B, F] of values [B, T] (scatter_add; autograd flows to `values`)."""
    out = torch.zeros(values.shape[0], max_documents_per_row, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, index, values)


@dataclass
class DocumentLosses:
    """Per-fragment losses of a batch of packed rows, slots [B, F] (F = max_documents_per_row)."""

    losses: torch.Tensor  # [B, F] float32 mean NLL over the fragment's valid tokens; 0 for an empty slot
    n_tokens: torch.Tensor  # [B, F] int64 valid-label count (0: empty slot)
    merged: torch.Tensor  # [B, F] bool: slot F - 1 of an overflow row (several fragments merged)
    overflow: torch.Tensor  # [B] bool: the row has more than F fragments
    count: torch.Tensor  # [B] int64 the row's true number of fragments


def document_losses(
    token_nll: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    max_documents_per_row: int = DEFAULT_MAX_DOCUMENTS,
) -> DocumentLosses:
    """Mean NLL f_d of every document fragment from the per-token NLL [B, T] (titan_rw.loss.per_token_nll).

    The NLL at input position t (predicting labels[t]) belongs to the fragment of position t, the
    grouping of the document-causal attention mask. Tokens with label IGNORE_INDEX (padding) count
    nowhere. `losses` keeps autograd to `token_nll`.
    """
    if token_nll.shape != labels.shape or labels.shape != positions.shape:
        raise ValueError(
            f"token_nll {tuple(token_nll.shape)}, labels {tuple(labels.shape)} and positions "
            f"{tuple(positions.shape)} must all be [B, T]"
        )
    index, count, overflow = fragment_index(positions, max_documents_per_row)
    valid = labels != IGNORE_INDEX
    nll = torch.where(valid, token_nll.float(), 0.0)  # select: a NaN on padding must not leak in
    sums = fragment_sums(nll, index, max_documents_per_row)
    n_tokens = fragment_sums(valid.to(torch.int64), index, max_documents_per_row)
    losses = sums / n_tokens.clamp(min=1).to(sums.dtype)
    last = torch.arange(max_documents_per_row, device=positions.device) == max_documents_per_row - 1
    merged = overflow[:, None] & last[None, :]
    return DocumentLosses(losses=losses, n_tokens=n_tokens, merged=merged, overflow=overflow, count=count)


def token_prior(losses: torch.Tensor, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi [n] float32 = n_d / N, present [n] bool): the token share over the non-empty fragments
    with a finite loss (N counts only those); 0 elsewhere."""
    present = (n_tokens > 0) & torch.isfinite(losses.detach())
    n = torch.where(present, n_tokens, 0).to(torch.float32)
    return n / n.sum().clamp(min=1.0), present


def document_weights(
    losses: torch.Tensor,
    n_tokens: torch.Tensor,
    strategy: str,
    temperature: float | torch.Tensor,
    *,
    cap: float | None = None,
    min_tokens: int = DEFAULT_MIN_DOCUMENT_TOKENS,
    merged: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of document fragments (flattened slots of the whole reweighting group).

    losses [n] (f_d), n_tokens [n] (n_d), merged [n] bool (optional). Returns (weights [n] float32,
    prior [n] float32 pi_d = n_d / N). Empty slots (n_d = 0) and non-finite losses get 0 and don't
    count in N. "Short" fragments (n_d < min_tokens, or merged) get exactly pi_d; the others ("long")
    share the remaining mass P = sum_long pi by sample_weights(valid=long, prior=pi): min-max over
    the long losses, w_d = P pi_d e^{s_d/r} / sum_long pi_e e^{s_e/r}. Weights sum to 1 (0 when no
    fragment counts). With `cap = c`: w_d <= c pi_d for every fragment. Detached; no host sync.
    """
    check_strategy(strategy)
    check_temperature(temperature)
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
        raise ValueError(f"min_tokens (reweight.min_document_tokens) must be an int >= 0, got {min_tokens!r}")
    if losses.dim() != 1 or n_tokens.shape != losses.shape:
        raise ValueError(
            f"losses and n_tokens must be 1-D of one shape (flattened fragment slots), got "
            f"{tuple(losses.shape)} and {tuple(n_tokens.shape)}"
        )
    if merged is not None and merged.shape != losses.shape:
        raise ValueError(f"merged shape {tuple(merged.shape)} does not match losses shape {tuple(losses.shape)}")
    f = losses.detach().float()
    pi, present = token_prior(f, n_tokens)
    short = present & (n_tokens < min_tokens)
    if merged is not None:
        short = short | (present & merged.to(torch.bool))
    if strategy == "uniform":  # exactly the token shares: the plain token-mean loss
        return torch.where(present, pi, 0.0), pi
    long = present & ~short
    w_long = sample_weights(f, strategy, temperature, cap=cap, valid=long, prior=pi)  # sums to 1 over long
    mass_long = torch.where(long, pi, 0.0).sum()  # P = 1 - sum_short pi
    return torch.where(short, pi, w_long * mass_long), pi

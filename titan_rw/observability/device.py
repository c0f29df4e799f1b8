"""On the device: the step's named metrics, reduced from its `WeightStats` with tensor ops only, and
the buffer that moves a whole log interval to the host in ONE transfer.

`step_metrics` names every scalar once (the names of metrics.jsonl); `sample_vectors` keeps the
per-sample vectors a histogram, the domain statistics or a samples table need. Nothing here reads a
device value on the host: `DeviceBuffer.to_host` is the interval's only device-to-host copy.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

Slot = tuple[int, tuple[int, ...]]  # (offset, shape) in the interval's flat float32 buffer


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(())


@torch.no_grad()
def step_metrics(groups: Sequence, bound_c: float, bound_tol: float) -> dict[str, torch.Tensor]:
    """The step's scalars as named 0-d float32 device tensors, over its reweighting groups (k under
    gradient accumulation in `microbatch` scope, each with weights summing to 1):

    loss, weighted_loss    the groups' mean of f̄ and of Σ w_i f_i
    max_weight, b          the step's largest weight and the b of its group (its bound is c / b)
    bound_ratio            the largest max_g·b_g/c (document granularity: max_d (w_d/π_d) / c)
    bound_violations       the groups above 1 + bound_tol
    ess, weight_entropy    the groups' mean of 1/Σw² and of −Σ w log w
    max_weight_ratio, overflow_rows   document granularity only: max w_d/π_d, rows past the slots
    """
    w = [g.weights.detach().float() for g in groups]
    max_w = torch.stack([_scalar(g.max_weight) for g in groups])
    b = torch.stack([_scalar(g.b) for g in groups])
    documents = groups[0].prior is not None  # the bound is w_d <= c π_d
    if documents:
        ratio = torch.stack([_scalar(g.max_ratio) for g in groups]) / bound_c
    else:
        ratio = max_w * b / bound_c  # each group against its own bound c / b_g
    top = max_w.argmax().reshape(1)  # the group holding the step's max weight
    out = {
        "loss": torch.stack([_scalar(g.mean_loss) for g in groups]).mean(),
        "weighted_loss": torch.stack([_scalar(g.weighted_loss) for g in groups]).mean(),
        "max_weight": max_w.max(),
        "b": b.gather(0, top).reshape(()),
        "bound_ratio": ratio.max(),
        "bound_violations": (ratio > 1.0 + bound_tol).float().sum(),
        "ess": torch.stack([1.0 / (x * x).sum().clamp(min=1e-30) for x in w]).mean(),
        "weight_entropy": torch.stack([-torch.where(x > 0, x * x.clamp(min=1e-30).log(), 0.0).sum() for x in w]).mean(),
    }
    if documents:
        out["max_weight_ratio"] = ratio.max() * bound_c
        out["overflow_rows"] = torch.stack([_scalar(g.overflow_rows) for g in groups]).sum()
    return out


@torch.no_grad()
def sample_vectors(groups: Sequence, *, losses: bool) -> dict[str, torch.Tensor]:
    """The step's per-sample vectors, the groups concatenated: weights, valid, group_b (each
    sample's own group's b: b·w = 1 is uniform weight in its group), at document granularity
    scale = 1/π_d (w·scale = 1 is a fragment's uniform weight), and the losses if asked for."""
    w = [g.weights.detach().float() for g in groups]
    b = [_scalar(g.b) for g in groups]
    out = {
        "weights": torch.cat(w),
        "valid": torch.cat([g.valid.detach().reshape(-1) for g in groups]),
        "group_b": torch.cat([bg.expand(x.numel()) for bg, x in zip(b, w)]),
    }
    if groups[0].prior is not None:
        pri = torch.cat([g.prior.detach().float() for g in groups])
        out["scale"] = torch.where(pri > 0, 1.0 / torch.where(pri > 0, pri, 1.0), 0.0)
    if losses:
        out["losses"] = torch.cat([g.losses.detach().reshape(-1) for g in groups])
    return out


class DeviceBuffer:
    """The pending device tensors of a log interval, flattened to float32; `to_host` concatenates
    them and copies them to the host at once. A step's named scalars go in as one stacked piece."""

    def __init__(self):
        self._pieces: list[torch.Tensor] = []
        self._len = 0

    def put(self, t: torch.Tensor) -> Slot:
        t = t.detach()
        off = self._len
        self._pieces.append(t.reshape(-1).to(torch.float32))
        self._len += t.numel()
        return off, tuple(t.shape)

    def put_named(self, named: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], Slot]:
        """Named 0-d tensors as one piece: (their names, its slot)."""
        return tuple(named), self.put(torch.stack([v.detach().float().reshape(()) for v in named.values()]))

    def put_vectors(self, named: Mapping[str, torch.Tensor]) -> dict[str, Slot]:
        return {k: self.put(v) for k, v in named.items()}

    def to_host(self) -> "HostBuffer":
        """The interval's one device-to-host transfer; the buffer is empty afterwards."""
        flat = torch.cat(self._pieces).cpu().numpy() if self._pieces else np.zeros(0, np.float32)
        self.clear()
        return HostBuffer(flat)

    def clear(self) -> None:
        self._pieces, self._len = [], 0


class HostBuffer:
    """The host copy of an interval's device buffer, read back by slot."""

    def __init__(self, flat: np.ndarray):
        self.flat = flat

    def get(self, slot: Slot) -> np.ndarray:
        off, shape = slot
        n = int(np.prod(shape)) if shape else 1
        return self.flat[off: off + n].reshape(shape)

    def named(self, names: tuple[str, ...], slot: Slot) -> dict[str, float]:
        return {k: float(x) for k, x in zip(names, self.get(slot))}

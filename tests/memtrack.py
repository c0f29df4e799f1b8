"""Peak bytes of live CPU tensor storage, counted at the dispatcher (tests/test_loss.py and
benchmarks/bench_step.py; not part of the package).

On CUDA use `torch.cuda.max_memory_allocated`; this is for the CPU, which has no allocator stats.

Every storage an aten op creates is counted once when it appears and released when its
StorageImpl dies (PyTorch preserves the storage's Python object while C++ holds it, so
tensors saved for backward stay counted).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live: set[int] = set()
        self.current = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live:
                continue
            self._live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def peak_bytes(fn) -> int:
    mode = PeakMemory()
    with mode:
        fn()
    return mode.peak

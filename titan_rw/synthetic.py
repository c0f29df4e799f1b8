"""A tiny built-in token source: deterministic, learnable rows, independent of the DP world size.

Used by tests (exact cross-world-size equality needs rows that do not depend on how many
ranks read them) and as a fallback when no corpus is available. Row `g` of the global
stream is a pure function of `(seed, g)`. Global micro-batch `j` is rows
`[j·B, (j+1)·B)` with `B = local_batch · dp_world`, and DP rank `k` holds its k-th slice, so
a 1-rank run with accumulation and an N-rank run see the same samples in the same global
order at every optimizer step. Checkpointable: its state is the next micro-batch index,
stored in global rows, so resuming on another DP world size neither repeats nor skips.

Rows are noisy arithmetic progressions modulo the vocabulary, with a per-row noise level,
so per-sample losses differ (something for the reweighting to act on) and fall quickly.
"""

from __future__ import annotations

import titan_rw  # noqa: F401

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer


def synthetic_row(seed: int, row: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """seq_len + 1 tokens of global row `row`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + row)
    start = int(torch.randint(0, vocab_size, (1,), generator=g))
    step = int(torch.randint(1, 17, (1,), generator=g))
    noise = float(torch.rand((), generator=g)) * 0.5
    t = torch.arange(seq_len + 1)
    tokens = (start + step * t) % vocab_size
    flip = torch.rand(seq_len + 1, generator=g) < noise
    rand = torch.randint(0, vocab_size, (seq_len + 1,), generator=g)
    return torch.where(flip, rand, tokens)


class SyntheticDataset(IterableDataset):
    def __init__(self, *, seed, vocab_size, seq_len, local_batch_size, dp_rank, dp_world_size):
        self.seed, self.vocab_size, self.seq_len = seed, vocab_size, seq_len
        self.b, self.rank, self.world = local_batch_size, dp_rank, dp_world_size
        self.next_row = 0  # global row id of the next global micro-batch
        self.rows_yielded = 0  # rows of the current micro-batch already yielded

    def __iter__(self):
        while True:
            i = self.rows_yielded
            row = synthetic_row(self.seed, self.next_row + self.rank * self.b + i, self.seq_len, self.vocab_size)
            if i + 1 == self.b:  # state is updated before the yield: a snapshot counts this row
                self.next_row, self.rows_yielded = self.next_row + self.b * self.world, 0
            else:
                self.rows_yielded = i + 1
            yield self._sample(row)

    def _sample(self, row: torch.Tensor):
        x, y = row[:-1], row[1:]
        return {"input": x, "positions": torch.arange(self.seq_len)}, y

    def state_dict(self) -> dict[str, Any]:
        return {"next_row": self.next_row, "rows_yielded": self.rows_yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_row, self.rows_yielded = state["next_row"], state["rows_yielded"]


class SyntheticDataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "synthetic"
        vocab_size: int = 2048
        seed: int = 0

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer=None,
                 seq_len: int, local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs):
        vocab = tokenizer.get_vocab_size() if tokenizer is not None else config.vocab_size
        ds = SyntheticDataset(seed=config.seed, vocab_size=min(vocab, config.vocab_size), seq_len=seq_len,
                              local_batch_size=local_batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size)
        super().__init__(ds, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size,
                         num_workers=0, snapshot_every_n_steps=snapshot_every_n_steps)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The stream is in global rows: any DP world size may resume it (no TorchTitan assert).
        if state_dict and self._rank_id not in state_dict and "world_size" in state_dict:
            any_key = next(k for k in state_dict if k.startswith("dp_rank_"))
            state_dict = {self._rank_id: state_dict[any_key], "world_size": self.dp_world_size}
        if state_dict:
            state_dict = {**state_dict, "world_size": self.dp_world_size}
        super().load_state_dict(state_dict)


class ByteTokenizer(BaseTokenizer):
    """Placeholder tokenizer for synthetic runs (tokens are produced, never text)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        vocab_size: int = 2048

    def __init__(self, config: Config | None = None, tokenizer_path: str | None = None, **kwargs):
        super().__init__()
        self.vocab_size = (config.vocab_size if config else 2048)
        self.eos_id = 0

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids, *args, **kwargs) -> str:
        return bytes(int(i) % 256 for i in ids).decode(errors="replace")

    def get_vocab_size(self) -> int:
        return self.vocab_size

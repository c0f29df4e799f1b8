"""A world-size-free token stream for TorchTitan: `TokenDataLoader`.

The global sequence of rows
---------------------------
Each dataset is one flat token stream (its documents, BOS ... EOS each, in shard order). Row r of a
dataset holds input tokens [r*L, r*L + L) and labels [r*L + 1, r*L + L + 1), L = seq_len, i.e. a
window of L + 1 tokens: every token is an input of exactly one row, and the label of every token
but the dataset's last. The final row is padded (input = EOS, label = -100). A dataset has
n_rows = ceil(n_tokens / L) rows per epoch; epoch e visits them in the order of a permutation
seeded by (seed, dataset index, e) (identity when shuffle=False). Epochs loop forever
(`infinite=True`, the default); with `infinite=False` the stream ends after the first epoch (of the
first dataset to finish one, for a mixture), the rows past it in the last batch being fully masked
(labels -100) so that every rank yields the same number of batches.

With several datasets, global row g is drawn from dataset d with probability weights[d]
(counter-based: block g // 4096 is seeded by (seed, block)), and takes that dataset's next row.

So the global row sequence is a function of (seed, data, seq_len) only. Micro-step t consumes
rows [t*B*W, (t+1)*B*W) (B = local_batch_size, W = dp_world_size); DP rank k serves rows
[k*B, (k+1)*B) of it. The global micro-batch at step t is the same for any W with the same B*W, and
the checkpoint state (global row cursor + per-dataset row counters) is identical on every rank, so a
run resumes on another DP size without repeating or skipping a token.

Batches
-------
`(input_dict, labels)`: `input_dict = {"input": int64[B, L], "positions": int64[B, L]}`, positions
restarting at 0 at every document start (and at the start of a row that begins mid-document, so
they stay < L for RoPE); `labels` int64[B, L], -100 (TorchTitan's IGNORE_INDEX) only for padding.

Provenance
----------
`loader.last_provenance` (after each batch) is a list, one entry per local row, of the documents in
that row in order: dicts `{dataset, shard, doc_index, domain, doc_id, row_offset, n_tokens, epoch,
row}`; the first is the document the row starts in (possibly mid-document). Padding rows give [].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.loss import IGNORE_INDEX  # the labels' padding value

from titan_rw.data.parquet import DataError
from titan_rw.data.shards import TokenSource, find_shards, open_shard_source
from titan_rw.data.streaming import open_parquet_source

logger = logging.getLogger("titan_rw.data")

STATE_KEY = "titan_rw_token_stream"
STATE_VERSION = 1
MIX_BLOCK = 4096


class PackedRows:
    """Rows of L + 1 tokens over one TokenSource, with a per-epoch permutation."""

    def __init__(self, source: TokenSource, seq_len: int, *, seed: int, index: int, shuffle: bool, pad_id: int):
        self.source = source
        self.seq_len = seq_len
        self.seed = seed
        self.index = index
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.n_rows = -(-source.n_tokens // seq_len)
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return None  # identity
        p = self._perms.get(epoch)
        if p is None:
            rng = np.random.default_rng([self.seed, self.index, epoch])
            p = rng.permutation(self.n_rows)
            if self.n_rows < 2**31:
                p = p.astype(np.int32)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = p
        return p

    def row_of(self, counter: int) -> tuple[int, int]:
        epoch, i = divmod(int(counter), self.n_rows)
        p = self.permutation(epoch)
        return epoch, (i if p is None else int(p[i]))

    def fill(self, row: int, inp: np.ndarray, lab: np.ndarray, pos: np.ndarray) -> tuple[int, int, int]:
        """Write row `row` into the 1-D views; return (token start, first doc, last doc)."""
        L = self.seq_len
        src = self.source
        s = row * L
        n_in = min(L, src.n_tokens - s)
        toks = src.read(s, s + L + 1)
        inp[:n_in] = toks[:n_in]
        lab[: len(toks) - 1] = toks[1:]
        if n_in < L:
            inp[n_in:] = self.pad_id
        lab[len(toks) - 1 :] = IGNORE_INDEX
        de = src.doc_ends
        d0 = int(np.searchsorted(de, s, side="right"))
        d1 = int(np.searchsorted(de, s + n_in - 1, side="right"))
        starts = de[d0:d1] - s  # documents d0+1..d1 start inside the row
        pos[:] = np.arange(L)
        if d1 > d0:
            mark = np.zeros(L, dtype=np.int64)
            mark[starts] = starts
            np.maximum.accumulate(mark, out=mark)
            pos -= mark
        return s, d0, d1


class TokenStream:
    """The world-size-free global row sequence over one or more datasets (no torch)."""

    def __init__(self, datasets: list[PackedRows], weights: list[float], seed: int, infinite: bool):
        self.datasets = datasets
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.seed = seed
        self.infinite = infinite
        self.global_row = 0
        self.counters = np.zeros(len(datasets), dtype=np.int64)
        self._block_cache: dict[int, np.ndarray] = {}

    # -- mixture ---------------------------------------------------------------------------------
    def _block(self, b: int) -> np.ndarray:
        c = self._block_cache.get(b)
        if c is None:
            rng = np.random.default_rng([self.seed, 0x6D6978, b])
            c = rng.choice(len(self.datasets), size=MIX_BLOCK, p=self.weights).astype(np.int64)
            if len(self._block_cache) >= 4:
                self._block_cache.pop(min(self._block_cache))
            self._block_cache[b] = c
        return c

    def choices(self, g0: int, n: int) -> np.ndarray:
        if len(self.datasets) == 1:
            return np.zeros(n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        g = g0
        while g < g0 + n:
            b, o = divmod(g, MIX_BLOCK)
            take = min(MIX_BLOCK - o, g0 + n - g)
            out[g - g0 : g - g0 + take] = self._block(b)[o : o + take]
            g += take
        return out

    # -- state -----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        if self.infinite:
            return False
        return bool(np.any(self.counters >= [d.n_rows for d in self.datasets]))

    def plan(self, n_global: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset index and per-dataset row counter of each of the next n_global rows."""
        ch = self.choices(self.global_row, n_global)
        ctr = np.empty(n_global, dtype=np.int64)
        for d in range(len(self.datasets)):
            m = ch == d
            ctr[m] = self.counters[d] + np.arange(int(m.sum()))
        return ch, ctr

    def advance(self, ch: np.ndarray) -> None:
        self.global_row += len(ch)
        self.counters += np.bincount(ch, minlength=len(self.datasets))

    def state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "global_row": int(self.global_row),
            "counters": [int(c) for c in self.counters],
            "seed": self.seed,
            "datasets": [d.source.name for d in self.datasets],
            "n_rows": [d.n_rows for d in self.datasets],
            "n_tokens": [d.source.n_tokens for d in self.datasets],
            "seq_len": self.datasets[0].seq_len,
            "weights": [float(x) for x in self.weights],
        }

    def load(self, st: dict) -> None:
        if st.get("version") != STATE_VERSION:
            raise ValueError(f"token stream state version {st.get('version')} != {STATE_VERSION}")
        mine = self.state()
        names = {"seq_len": "training.seq_len", "n_tokens": "data (tokens per dataset: n_tokens)", "seed": "data.seed"}
        differ = [k for k in ("seq_len", "n_tokens", "seed") if st.get(k) != mine[k]]
        if differ:
            from titan_rw.checkpointing import ResumeMismatch

            raise ResumeMismatch(
                "dataloader checkpoint was made with "
                + ", ".join(f"{k}={st.get(k)}, this run has {mine[k]}" for k in differ)
                + ": resuming would repeat or skip data (same data, seed and seq_len are required)",
                changes=[(names[k], st.get(k), mine[k]) for k in differ],
            )
        if not np.allclose(st.get("weights", []), mine["weights"]):
            logger.warning("mixture weights changed since the checkpoint: %s -> %s", st.get("weights"), mine["weights"])
        self.global_row = int(st["global_row"])
        self.counters = np.asarray(st["counters"], dtype=np.int64)


def _embedded(split: str) -> str:
    from titan_rw.data import EMBEDDED_CORPUS

    return os.path.join(EMBEDDED_CORPUS, split)


def resolve_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if "://" in path:
        return "parquet"
    if path.endswith(".ds"):
        return "shards"
    if path.endswith(".parquet"):
        return "parquet"
    try:
        if find_shards(path):
            return "shards"
    except DataError:
        pass
    return "parquet"


class TokenDataLoader(BaseDataLoader):
    """See the module docstring. Config defaults stream the shipped corpus with the run's tokenizer."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        dataset: str = "embedded"
        """Name. With no dataset_path/datasets: 'embedded' (shipped train split) or
        'embedded_validation' (held-out split)."""

        dataset_path: str | None = None
        """Directory/glob/file of datatrove `.ds` shards, or parquet file/dir/glob/fsspec URL."""

        format: Literal["auto", "shards", "parquet"] = "auto"
        """auto: `.ds` files found under the path -> shards; else parquet (tokenized on the fly)."""

        datasets: list[str] = field(default_factory=list)
        """Mixture: several paths (each like dataset_path); overrides dataset_path when set."""

        weights: list[float] = field(default_factory=list)
        """Mixture weights (> 0, normalized), one per entry of `datasets`; empty = equal."""

        seed: int = 0
        shuffle: bool = True
        """Shuffle rows per epoch (a new permutation each epoch)."""

        infinite: bool = True
        """Loop epochs forever; False: stop after one epoch (the Validator sets this)."""

        tokenizer_path: str = ""
        """Parquet mode: sentencepiece model to tokenize with. Empty: the tokenizer passed to
        build() (the Trainer's), else the shipped one."""

        add_bos: bool = True
        add_eos: bool = True
        text_key: str = "text"
        check_tokenizer: bool = True
        """Shards mode: refuse shards whose metadata names another tokenizer."""

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int = 1,
        dp_rank: int = 0,
        tokenizer=None,
        seq_len: int = 2048,
        local_batch_size: int = 1,
        snapshot_every_n_steps: int | None = None,
        **kwargs,
    ):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} outside dp_world_size {dp_world_size}")
        if seq_len < 1 or local_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and local_batch_size ({local_batch_size}) must be >= 1")
        self.config = config
        self.dp_world_size = dp_world_size
        self.dp_rank = dp_rank
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.tokenizer = tokenizer

        paths = list(config.datasets) or [config.dataset_path or _embedded(
            "validation" if config.dataset in ("embedded_validation", "validation") else "train")]
        weights = list(config.weights) if config.weights else [1.0] * len(paths)
        if len(weights) != len(paths):
            raise DataError(f"mixture: {len(weights)} weights for {len(paths)} datasets {paths}")
        for p, w in zip(paths, weights):
            if not (w > 0 and np.isfinite(w)):
                raise DataError(f"mixture weight {w} for {p}: weights must be finite and > 0")

        sources = [self._open(p) for p in paths]
        pad = getattr(self._text_tokenizer_or_none(), "eos_id", None)
        pad_id = int(pad) if pad is not None else 0
        packed = [
            PackedRows(s, seq_len, seed=config.seed, index=i, shuffle=config.shuffle, pad_id=pad_id)
            for i, s in enumerate(sources)
        ]
        self.stream = TokenStream(packed, weights, config.seed, config.infinite)
        self._last: list[tuple] = []
        logger.info(
            "TokenDataLoader: %s; seq_len=%d, %d x %d rows per micro-step, rank %d",
            ", ".join(f"{s.name} ({s.n_tokens} tokens, {p.n_rows} rows, w={w:.3f})"
                      for s, p, w in zip(sources, packed, self.stream.weights)),
            seq_len, local_batch_size, dp_world_size, dp_rank,
        )

    @staticmethod
    def preflight(config: "TokenDataLoader.Config", tokenizer_path: str | None = None) -> None:
        """Cheap checks before anything is built (no tokenizing): every path exists and resolves to
        shards or parquet files, every local parquet footer reads and has the text column, a
        parquet dataset has rows and not every text is null (footer statistics), and the shards'
        metadata names the run's tokenizer (`config.tokenizer_path`, else `tokenizer_path`: the
        trainer's). DataError naming the path."""
        from titan_rw.data.parquet import is_remote, check_columns, expand_parquet_paths, null_text_rows, open_parquet
        from titan_rw.data.shards import check_shard_tokenizer, read_metadata

        tokenizer = None
        for path in list(config.datasets) or ([config.dataset_path] if config.dataset_path else []):
            fmt = resolve_format(path, config.format)
            if fmt == "shards":
                shards = find_shards(path)
                if not shards:
                    raise DataError(f"{path}: no .ds token shards found")
                if config.check_tokenizer and (config.tokenizer_path or tokenizer_path):
                    if tokenizer is None:
                        from titan_rw.data.tokenizer import SentencePieceTokenizer

                        tokenizer = SentencePieceTokenizer(tokenizer_path=config.tokenizer_path or tokenizer_path)
                    for ds in shards:
                        check_shard_tokenizer(ds, read_metadata(ds), tokenizer)
                continue
            files = expand_parquet_paths(path)
            local = [f for f in files if not is_remote(f)]
            rows, nulls = 0, 0
            for f in local:
                pf = open_parquet(f)
                check_columns(pf, f, config.text_key)
                rows += pf.metadata.num_rows
                n = null_text_rows(pf, f, config.text_key)
                nulls = None if n is None or nulls is None else nulls + n
            whole = local and len(local) == len(files)
            shown = ", ".join(os.path.abspath(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
            if whole and rows == 0:
                raise DataError(f"{os.path.abspath(path)}: empty dataset: its {len(files)} parquet file(s) hold no rows ({shown})")
            if whole and nulls == rows:
                raise DataError(
                    f"{os.path.abspath(path)}: every '{config.text_key}' value is null ({rows} rows in {len(files)} "
                    f"parquet file(s): {shown}): no document to train on; write the documents' text into the "
                    f"'{config.text_key}' column, or point the loader at another dataset"
                )

    # -- building --------------------------------------------------------------------------------
    def _text_tokenizer_or_none(self):
        return self.tokenizer if self.tokenizer is not None else getattr(self, "_own_tokenizer", None)

    def _text_tokenizer(self):
        cfg = self.config
        if cfg.tokenizer_path:
            own = getattr(self, "_own_tokenizer", None)
            if own is None:
                from titan_rw.data.tokenizer import SentencePieceTokenizer

                own = self._own_tokenizer = SentencePieceTokenizer(tokenizer_path=cfg.tokenizer_path)
            return own
        if self.tokenizer is not None:
            return self.tokenizer
        from titan_rw.data import DEFAULT_TOKENIZER
        from titan_rw.data.tokenizer import SentencePieceTokenizer

        self._own_tokenizer = SentencePieceTokenizer(tokenizer_path=DEFAULT_TOKENIZER)
        return self._own_tokenizer

    def _open(self, path: str) -> TokenSource:
        cfg = self.config
        fmt = resolve_format(path, cfg.format)
        if fmt == "shards":
            tok = self.tokenizer if self.tokenizer is not None else (
                self._text_tokenizer() if cfg.tokenizer_path else None)
            if tok is None and cfg.check_tokenizer:
                logger.warning("%s: no tokenizer given, shard tokenizer metadata not checked", path)
            return open_shard_source(path, tok, check_tokenizer=cfg.check_tokenizer and tok is not None)
        if fmt == "parquet":
            return open_parquet_source(
                path, self._text_tokenizer(), add_bos=cfg.add_bos, add_eos=cfg.add_eos, text_key=cfg.text_key
            )
        raise DataError(f"unknown dataloader format {fmt!r} for {path}")

    # -- iteration -------------------------------------------------------------------------------
    @property
    def global_batch_rows(self) -> int:
        return self.local_batch_size * self.dp_world_size

    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """The next local batch (advancing the global cursor by B * W rows), or None once a
        non-infinite stream has ended. `__iter__` is a loop over this."""
        st = self.stream
        if st.finished:
            return None
        B, L = self.local_batch_size, self.seq_len
        ch, ctr = st.plan(self.global_batch_rows)
        lo = self.dp_rank * B
        inp = np.empty((B, L), dtype=np.int64)
        lab = np.empty((B, L), dtype=np.int64)
        pos = np.empty((B, L), dtype=np.int64)
        last = []
        for j in range(B):
            d, c = int(ch[lo + j]), int(ctr[lo + j])
            ds = st.datasets[d]
            if not st.infinite and c >= ds.n_rows:
                inp[j] = ds.pad_id
                lab[j] = IGNORE_INDEX
                pos[j] = np.arange(L)
                last.append(None)
                continue
            epoch, row = ds.row_of(c)
            s, d0, d1 = ds.fill(row, inp[j], lab[j], pos[j])
            last.append((d, epoch, row, s, d0, d1))
        st.advance(ch)
        self._last = last
        return {"input": torch.from_numpy(inp), "positions": torch.from_numpy(pos)}, torch.from_numpy(lab)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    @property
    def last_provenance(self) -> list[list[dict]]:
        """Per local row of the last batch: the documents in it (see module docstring)."""
        out = []
        for item in self._last:
            if item is None:
                out.append([])
                continue
            d, epoch, row, s, d0, d1 = item
            ds = self.stream.datasets[d]
            src = ds.source
            de = src.doc_ends
            docs = []
            end = min(s + self.seq_len, src.n_tokens)
            for g in range(d0, d1 + 1):
                lo = max(int(de[g - 1]) if g else 0, s)
                hi = min(int(de[g]), end)
                info = src.describe_doc(g)
                info.update(row_offset=lo - s, n_tokens=hi - lo, epoch=epoch, row=row)
                docs.append(info)
            out.append(docs)
        return out

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """World-size free: every rank returns the same single key, so DCP stores one copy and any
        number of ranks can load it."""
        from titan_rw.checkpointing import json_tensor

        return {STATE_KEY: json_tensor(self.stream.state())}  # JSON in a uint8 tensor: no pickle

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if STATE_KEY not in state_dict:
            logger.warning("dataloader state has no %s (keys %s); starting from the beginning",
                           STATE_KEY, sorted(state_dict))
            return
        from titan_rw.checkpointing import load_plain

        # this version: a JSON tensor; earlier versions: pickled bytes, read as plain data only
        st = load_plain(state_dict[STATE_KEY], f"dataloader.{STATE_KEY}")
        self.stream.load(st)
        self._last = []

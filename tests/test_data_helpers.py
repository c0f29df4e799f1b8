"""Shared fixtures-as-functions for the data tests (no tests here)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_shard(path: str, docs: list[np.ndarray], *, tokenizer: str = "synthetic", token_size: int = 4,
                domains: list[str] | None = None) -> str:
    """A datatrove-format shard from token arrays (one per document)."""
    dtype = "<u2" if token_size == 2 else "<u4"
    flat = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
    flat.tofile(path)
    ends = np.cumsum([len(d) for d in docs]).astype("<u8")
    ends.tofile(path + ".index")
    with open(path + ".metadata", "w") as f:
        f.write(f"{tokenizer}|{token_size}\n{len(flat)}\n{len(flat)} T")
    if domains is not None:
        pq.write_table(pa.table({"id": [f"{os.path.basename(path)}:{i}" for i in range(len(docs))],
                                 "domain": domains}), path + ".docs")
    return path


def synthetic_dataset(root: str, n_shards: int, docs_per_shard: int, *, seed: int = 0, start: int = 1,
                      max_len: int = 60, domain: str | None = None) -> tuple[str, int]:
    """Shards whose tokens are consecutive unique integers start, start+1, ... (so coverage is
    checkable by value); random document lengths 1..max_len. Returns (dir, total tokens)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    v = start
    for s in range(n_shards):
        docs = []
        for _ in range(docs_per_shard):
            n = int(rng.integers(1, max_len + 1))
            docs.append(np.arange(v, v + n))
            v += n
        write_shard(os.path.join(root, f"shard_{s:05d}.ds"), docs,
                    domains=[domain or os.path.basename(root)] * len(docs))
    return root, v - start


def write_docs_parquet(path: str, texts: list, *, text_type=pa.string(), extra: dict | None = None) -> str:
    cols = {"text": pa.array(texts, type=text_type),
            "id": [f"doc{i}" for i in range(len(texts))],
            "domain": ["test"] * len(texts)}
    cols.update(extra or {})
    pq.write_table(pa.table(cols), path)
    return path


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory):
    """The whole embedded corpus (train + validation, 8 parquet files) tokenized by the real
    datatrove pipeline: (dir, tokenizer). Shards 0-3 are train, 4-7 validation (sorted input order)."""
    import titan_rw  # noqa: F401
    from titan_rw.data import DEFAULT_TOKENIZER, EMBEDDED_CORPUS
    from titan_rw.data.tokenize import run_tokenize
    from titan_rw.data.tokenizer import SentencePieceTokenizer

    out = str(tmp_path_factory.mktemp("real_shards"))
    run_tokenize(EMBEDDED_CORPUS, out, DEFAULT_TOKENIZER, workers=1, progress=False)
    return out, SentencePieceTokenizer(tokenizer_path=DEFAULT_TOKENIZER)


def validation_shards(out: str) -> str:
    return os.path.join(out, "shard_0000[4-7].ds")

"""Token shards in datatrove's format, and a flat token view over many of them.

A shard `NAME.ds` is raw little-endian tokens (uint16 if the vocab fits, else uint32);
`NAME.ds.index` holds uint64 cumulative document ends; `NAME.ds.metadata` three lines
(`<tokenizer>|<token bytes>`, token count, human count). Ours also writes `NAME.ds.docs`, a small
parquet file with one row per document (`id`, `domain`) for provenance. Shards from datatrove's own
`DocumentTokenizer` (or nanotron tooling) load too; without `.ds.docs` a document's domain is the
dataset's name and its id `<shard>#<index>`.

`TokenSource` concatenates the parts of one dataset into one flat token stream with a global
document index, computed once (numpy, memory-mapped tokens).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from titan_rw.data.parquet import DataError

logger = logging.getLogger("titan_rw.data")

DOCS_SUFFIX = ".docs"
ID_ROW_GROUP = 65536


@dataclass
class ShardMetadata:
    tokenizer: str
    token_size: int
    token_count: int


def read_metadata(ds_path: str) -> ShardMetadata:
    path = ds_path + ".metadata"
    try:
        with open(path) as f:
            lines = f.read().splitlines()
        name, _, size = lines[0].rpartition("|")
        return ShardMetadata(name, int(size), int(lines[1]))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; cannot tell which tokenizer made {ds_path}") from None
    except (IndexError, ValueError) as e:
        raise DataError(f"{path}: malformed shard metadata ({e})") from None


def tokenizer_matches(recorded: str, tokenizer) -> bool:
    """Shards record `<path>#sha256=<hex16>` (ours) or a tokenizer name/path (datatrove's)."""
    m = re.search(r"#sha256=([0-9a-f]{8,64})", recorded)
    sha = getattr(tokenizer, "sha256", None)
    if m and sha:
        return sha.startswith(m.group(1))
    path = getattr(tokenizer, "model_path", None) or getattr(tokenizer, "tokenizer_path", None)
    if not path:
        return False
    cands = {os.path.abspath(path), os.path.abspath(os.path.dirname(path))}
    rec = recorded.split("#", 1)[0]
    return rec == path or (os.path.exists(rec) and os.path.abspath(rec) in cands)


def _fingerprint(tokenizer) -> str:
    return getattr(tokenizer, "fingerprint", None) or repr(tokenizer)


@dataclass
class Part:
    """One shard (or one in-memory tokenized parquet file) of a dataset."""

    name: str
    tokens: np.ndarray  # memmap or ndarray, uint16/uint32
    doc_ends: np.ndarray  # int64 cumulative ends, local to this part
    domain_codes: np.ndarray | None = None  # int32 per document, into domain_names
    domain_names: list[str] = field(default_factory=list)
    ids: list[str] | None = None  # in-memory parts keep ids; shards read them lazily
    docs_path: str | None = None
    _id_cache: OrderedDict = field(default_factory=OrderedDict)

    @property
    def n_tokens(self) -> int:
        return int(self.doc_ends[-1]) if len(self.doc_ends) else 0

    @property
    def n_docs(self) -> int:
        return len(self.doc_ends)

    def domain(self, i: int, default: str) -> str:
        if self.domain_codes is None:
            return default
        return self.domain_names[int(self.domain_codes[i])]

    def doc_id(self, i: int) -> str:
        if self.ids is not None:
            return self.ids[i]
        if self.docs_path is None:
            return f"{self.name}#{i}"
        g = i // ID_ROW_GROUP
        if g not in self._id_cache:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.docs_path)
            per = pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups else 1
            if per != ID_ROW_GROUP:  # written by someone else: read the whole column once
                self.ids = pf.read(columns=["id"]).column(0).to_pylist()
                return self.ids[i]
            self._id_cache[g] = pf.read_row_group(g, columns=["id"]).column(0).to_pylist()
            while len(self._id_cache) > 4:
                self._id_cache.popitem(last=False)
        return self._id_cache[g][i - g * ID_ROW_GROUP]


def check_shard_tokenizer(ds_path: str, meta: ShardMetadata, tokenizer) -> None:
    """DataError unless the shard's metadata names `tokenizer` (the loader at build, and the
    preflight before the model is built)."""
    if not tokenizer_matches(meta.tokenizer, tokenizer):
        raise DataError(
            f"{ds_path}: tokenized with {meta.tokenizer!r}, but this run's tokenizer is "
            f"{_fingerprint(tokenizer)}: re-tokenize them (titan-rw tokenize), set data.tokenizer to the model that made "
            f"them, or point the loader at matching shards"
        )


def open_shard(ds_path: str, tokenizer=None, *, check_tokenizer: bool = True) -> Part:
    """Memory-map one `.ds` shard after checking its index, metadata and tokenizer."""
    meta = read_metadata(ds_path) if (check_tokenizer or os.path.exists(ds_path + ".metadata")) else None
    if meta is not None and tokenizer is not None and check_tokenizer:
        check_shard_tokenizer(ds_path, meta, tokenizer)
    token_size = meta.token_size if meta is not None else 2
    if token_size not in (2, 4):
        raise DataError(f"{ds_path}.metadata: token size {token_size} bytes is not 2 or 4")
    if tokenizer is not None and token_size == 2 and tokenizer.get_vocab_size() > 65536:
        raise DataError(f"{ds_path}: uint16 tokens cannot hold a vocabulary of {tokenizer.get_vocab_size()}")
    try:
        nbytes = os.path.getsize(ds_path)
        index_bytes = os.path.getsize(ds_path + ".index")
    except FileNotFoundError as e:
        raise DataError(f"{e.filename}: missing (a shard needs .ds, .ds.index and .ds.metadata)") from None
    if nbytes % token_size or index_bytes % 8:
        raise DataError(f"{ds_path}: size {nbytes} B / index {index_bytes} B not whole tokens: truncated?")
    n_tokens = nbytes // token_size
    doc_ends = np.fromfile(ds_path + ".index", dtype="<u8").astype(np.int64)
    last = int(doc_ends[-1]) if len(doc_ends) else 0
    if last != n_tokens or (len(doc_ends) and (np.any(np.diff(doc_ends) < 0) or doc_ends[0] < 0)):
        raise DataError(f"{ds_path}: index ends at {last} tokens but the shard holds {n_tokens}: truncated or mismatched")
    if meta is not None and meta.token_count not in (n_tokens, -1):
        raise DataError(f"{ds_path}: metadata says {meta.token_count} tokens, file holds {n_tokens}: truncated?")
    dtype = np.dtype("<u2" if token_size == 2 else "<u4")
    tokens = np.memmap(ds_path, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
    part = Part(name=ds_path, tokens=tokens, doc_ends=doc_ends)
    docs_path = ds_path + DOCS_SUFFIX
    if os.path.exists(docs_path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            col = pq.read_table(docs_path, columns=["domain"]).column(0)
        except Exception as e:
            raise DataError(f"{docs_path}: unreadable provenance sidecar ({e})") from e
        if len(col) != len(doc_ends):
            raise DataError(f"{docs_path}: {len(col)} rows for {len(doc_ends)} documents in {ds_path}")
        enc = pa.chunked_array(col).combine_chunks().dictionary_encode() if len(col) else None
        if enc is not None:
            part.domain_codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32)
            part.domain_names = [str(x) for x in enc.dictionary.to_pylist()]
        part.docs_path = docs_path
    return part


def find_shards(spec: str) -> list[str]:
    """`.ds` files named by a directory (recursive), a glob, or one file."""
    spec = os.path.expanduser(spec)
    if any(c in spec for c in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if f.endswith(".ds"))
    elif os.path.isdir(spec):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if f.endswith(".ds"))
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise DataError(f"{spec}: no such file or directory")
    return files


class TokenSource:
    """One dataset: its parts concatenated into a flat token stream with a global document index."""

    def __init__(self, name: str, parts: list[Part]):
        skipped = [p.name for p in parts if p.n_tokens == 0]
        for s in skipped:
            logger.warning("dataset %s: %s holds no tokens; skipped", name, s)
        self.name = name
        self.skipped_parts = skipped
        self.parts = [p for p in parts if p.n_tokens > 0]
        if not self.parts:
            raise DataError(f"{name}: empty dataset (no documents with tokens in {len(parts)} file(s))")
        self.part_tokens = np.cumsum([0] + [p.n_tokens for p in self.parts]).astype(np.int64)
        self.part_docs = np.cumsum([0] + [p.n_docs for p in self.parts]).astype(np.int64)
        self.doc_ends = np.concatenate(
            [p.doc_ends + off for p, off in zip(self.parts, self.part_tokens[:-1])]
        ).astype(np.int64)
        self.n_tokens = int(self.part_tokens[-1])
        self.n_docs = int(self.part_docs[-1])
        self.token_dtype = np.result_type(*[p.tokens.dtype for p in self.parts])

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the flat stream as int64 (end clipped to the stream)."""
        end = min(end, self.n_tokens)
        i = int(np.searchsorted(self.part_tokens, start, side="right")) - 1
        off = int(self.part_tokens[i])
        if end <= int(self.part_tokens[i + 1]):
            return self.parts[i].tokens[start - off : end - off].astype(np.int64)
        out = np.empty(end - start, dtype=np.int64)
        pos = start
        while pos < end:
            off, nxt = int(self.part_tokens[i]), int(self.part_tokens[i + 1])
            stop = min(end, nxt)
            out[pos - start : stop - start] = self.parts[i].tokens[pos - off : stop - off]
            pos = stop
            i += 1
        return out

    def locate_doc(self, g: int) -> tuple[Part, int]:
        i = int(np.searchsorted(self.part_docs, g, side="right")) - 1
        return self.parts[i], g - int(self.part_docs[i])

    def describe_doc(self, g: int) -> dict:
        part, local = self.locate_doc(g)
        return {
            "dataset": self.name,
            "shard": part.name,
            "doc_index": local,
            "domain": part.domain(local, self.name),
            "doc_id": part.doc_id(local),
        }

    def domain_of_docs(self, gdocs: np.ndarray) -> list[str]:
        return [self.describe_doc(int(g))["domain"] for g in gdocs]


def open_shard_source(spec: str, tokenizer=None, *, check_tokenizer: bool = True, name: str | None = None) -> TokenSource:
    files = find_shards(spec)
    if not files:
        raise DataError(f"{spec}: no .ds token shards found (empty dataset)")
    parts = [open_shard(f, tokenizer, check_tokenizer=check_tokenizer) for f in files]
    return TokenSource(name or dataset_name(spec), parts)


def dataset_name(spec: str) -> str:
    s = spec.rstrip("/")
    base = os.path.basename(s)
    if any(c in base for c in "*?["):
        base = os.path.basename(os.path.dirname(s))
    return base.removesuffix(".ds").removesuffix(".parquet") or s

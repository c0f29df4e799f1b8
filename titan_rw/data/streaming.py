"""Streaming mode: parquet text tokenized on the fly into the same `TokenSource` the shard
reader builds, so packing, shuffling, mixture and checkpoint state are shared code.

The whole input is tokenized once, at loader build, in memory (the shipped corpus: ~7 MB of text,
~2 s). That is meant for the embedded default and small runs; for FineWeb-sized data use
`titan-rw tokenize` once and point the loader at the shards.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from titan_rw.data import token_cache
from titan_rw.data.parquet import MAX_SKIPPED_EXAMPLES, DataError, ReadStats, expand_parquet_paths, iter_parquet_documents
from titan_rw.data.shards import Part, TokenSource, dataset_name

logger = logging.getLogger("titan_rw.data")

WARN_TEXT_BYTES = 512 * 2**20


def tokenize_texts(tokenizer, texts: list[str], add_bos: bool, add_eos: bool) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        try:
            return tokenizer.encode_batch(texts, add_bos=add_bos, add_eos=add_eos)
        except TypeError:
            pass
    return [tokenizer.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]


def parquet_part(path: str, tokenizer, *, add_bos=True, add_eos=True, text_key="text", stats: ReadStats | None = None) -> Part:
    """One parquet file tokenized (or read back from `TITAN_RW_TOKEN_CACHE_DIR`, titan_rw.data.token_cache)."""
    key = token_cache.entry_key(path, tokenizer, add_bos=add_bos, add_eos=add_eos, text_key=text_key) \
        if token_cache.folder() else None
    entry = token_cache.load(key) if key else None
    if entry is None:
        entry = _tokenize_part(path, tokenizer, add_bos=add_bos, add_eos=add_eos, text_key=text_key)
        if key:
            token_cache.store(key, **entry)
    if stats is not None:
        _merge_stats(stats, entry["stats"])
    return Part(name=path, tokens=entry["tokens"], doc_ends=entry["doc_ends"], domain_codes=entry["domain_codes"],
                domain_names=entry["domain_names"], ids=entry["ids"])


def _tokenize_part(path: str, tokenizer, *, add_bos, add_eos, text_key) -> dict:
    texts, ids, domains = [], [], []
    stats = ReadStats()
    for text, doc_id, domain, _ in iter_parquet_documents(path, text_key=text_key, stats=stats):
        texts.append(text)
        ids.append(doc_id)
        domains.append(domain)
    encoded = tokenize_texts(tokenizer, texts, add_bos, add_eos) if texts else []
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    tokens = np.fromiter((t for e in encoded for t in e), dtype=dtype, count=int(lengths.sum()))
    names = sorted(set(domains))
    lookup = {n: i for i, n in enumerate(names)}
    return {
        "tokens": tokens,
        "doc_ends": np.cumsum(lengths).astype(np.int64),
        "domain_codes": np.array([lookup[d] for d in domains], dtype=np.int32),
        "domain_names": names,
        "ids": ids,
        "stats": {"documents": stats.documents, "empty": stats.empty, "invalid_utf8": stats.invalid_utf8,
                  "skipped_examples": stats.skipped_examples},
    }


def _merge_stats(into: ReadStats, one: dict) -> None:
    """One file's counts added to the run's (the examples capped as `ReadStats.skip` caps them)."""
    into.documents += one["documents"]
    into.empty += one["empty"]
    into.invalid_utf8 += one["invalid_utf8"]
    into.skipped_examples.extend(one["skipped_examples"][: max(0, MAX_SKIPPED_EXAMPLES - len(into.skipped_examples))])


_CACHE: dict = {}
_CACHE_MAX = 4


def _cache_key(files: list[str], tokenizer, add_bos, add_eos, text_key, name):
    stamps = []
    for f in files:
        try:
            st = os.stat(f)
            stamps.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            return None  # remote or vanished: do not cache
    tok_id = getattr(tokenizer, "sha256", None) or id(tokenizer)
    return (tuple(stamps), tok_id, add_bos, add_eos, text_key, name)


def open_parquet_source(
    spec, tokenizer, *, add_bos=True, add_eos=True, text_key="text", name: str | None = None
) -> TokenSource:
    """Tokenize parquet into a TokenSource. Local inputs are cached in-process (keyed by file
    size/mtime and tokenizer hash), so e.g. the Validator's loader, rebuilt at every validation,
    tokenizes the held-out split once."""
    files = expand_parquet_paths(spec)
    key = _cache_key(files, tokenizer, add_bos, add_eos, text_key, name)
    if key is not None and key in _CACHE:
        return _CACHE[key]
    src = _open_parquet_source(files, spec, tokenizer, add_bos=add_bos, add_eos=add_eos, text_key=text_key, name=name)
    if key is not None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = src
    return src


def _open_parquet_source(files, spec, tokenizer, *, add_bos, add_eos, text_key, name) -> TokenSource:
    stats = ReadStats()
    t0 = time.perf_counter()
    total = 0
    for f in files:
        try:
            total += os.path.getsize(f)
        except OSError:
            pass
    if total > WARN_TEXT_BYTES:
        logger.warning(
            "streaming %.1f GB of parquet tokenizes it all in memory; run `titan-rw tokenize` once instead",
            total / 2**30,
        )
    parts = [parquet_part(f, tokenizer, add_bos=add_bos, add_eos=add_eos, text_key=text_key, stats=stats) for f in files]
    if stats.skipped:
        logger.warning(
            "%s: skipped %d documents (%d empty, %d invalid UTF-8); e.g. %s",
            spec, stats.skipped, stats.empty, stats.invalid_utf8, stats.skipped_examples[:3],
        )
    try:
        src = TokenSource(name or dataset_name(str(spec)), parts)
    except DataError as e:  # name the dataset's full path and its files
        shown = ", ".join(os.path.abspath(f) if "://" not in f else f for f in files[:3]) + (", ..." if len(files) > 3 else "")
        full = str(spec) if "://" in str(spec) else os.path.abspath(str(spec))
        raise DataError(f"{e}: {full} ({shown}) [{stats.skipped} document(s) skipped: {stats.skipped_examples[:3]}]") from None
    src.read_stats = stats
    logger.info(
        "streamed %s: %d files, %d docs, %d tokens in %.1fs",
        src.name, len(files), src.n_docs, src.n_tokens, time.perf_counter() - t0,
    )
    return src

"""An opt-in disk cache of tokenized parquet files: `TITAN_RW_TOKEN_CACHE_DIR=<folder>`.

Streaming mode tokenizes its parquet at every loader build (the shipped corpus: ~2 s of CPU per
process). Many short runs on the same small data (a test suite, a sweep of debug runs) can keep the
result instead: with the variable set, each parquet file's tokens, document ends, domains, ids and
read statistics are stored as one `.npz` per file in that folder and read back by later processes.

This module is the one place of that format. An entry is keyed by everything the result depends on:
the file's absolute path and the sha256 of its bytes, the tokenizer model's sha256, `add_bos`,
`add_eos`, the text column and the format version (`VERSION`); a changed file or tokenizer is a new
entry, never a stale one. Entries are written whole to a temporary file and published with
`os.replace`, so concurrent processes never read a torn one; an unreadable entry is ignored (and
rewritten). No pickle: arrays are numeric, the rest is JSON stored as bytes. Unset (the default),
nothing is read or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid

import numpy as np

ENV = "TITAN_RW_TOKEN_CACHE_DIR"
VERSION = 1
logger = logging.getLogger("titan_rw.data")


def folder() -> str | None:
    return os.environ.get(ENV) or None


def entry_key(path: str, tokenizer, *, add_bos: bool, add_eos: bool, text_key: str) -> str | None:
    """The entry's name for this file and tokenizer, or None when it cannot be keyed safely
    (a remote file, a tokenizer without a model hash)."""
    tok = getattr(tokenizer, "sha256", None)
    if not tok or "://" in path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    parts = [str(VERSION), os.path.abspath(path), h.hexdigest(), tok, str(add_bos), str(add_eos), text_key]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def load(key: str) -> dict | None:
    """{tokens, doc_ends, domain_codes, domain_names, ids, stats} of an entry, or None."""
    path = os.path.join(folder() or "", key + ".npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return {"tokens": z["tokens"], "doc_ends": z["doc_ends"], "domain_codes": z["domain_codes"], **meta}
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged entry: tokenize again (and replace it)
        logger.warning("token cache: ignoring unreadable %s (%s: %s)", path, type(e).__name__, e)
        return None


def store(key: str, *, tokens, doc_ends, domain_codes, domain_names, ids, stats: dict) -> None:
    """Publish an entry; a cache that cannot be written costs only the time it would have saved."""
    d = folder()
    if not d:
        return
    meta = json.dumps({"domain_names": domain_names, "ids": ids, "stats": stats}).encode()
    tmp = os.path.join(d, f".{key}.{uuid.uuid4().hex}.tmp.npz")
    try:
        os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, tokens=tokens, doc_ends=doc_ends, domain_codes=domain_codes,
                     meta=np.frombuffer(meta, dtype=np.uint8))
        os.replace(tmp, os.path.join(d, key + ".npz"))
    except OSError as e:
        logger.warning("token cache: cannot write to %s (%s); going on without it", d, e)
        try:
            os.remove(tmp)
        except OSError:
            pass

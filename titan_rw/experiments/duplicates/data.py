"""The derived training set (documents cut into pieces, a seeded share repeated, shuffled into one
parquet) and each sample's share of tokens from duplicated documents."""

from __future__ import annotations

import os

import numpy as np

from titan_rw.experiments.duplicates.config import DupConfig


def _split_text(text: str, limit: int) -> list[str]:
    """Cut at line boundaries into pieces of at most ~limit characters (a single longer line is
    cut hard). Concatenating the pieces gives the text back."""
    if len(text) <= limit:
        return [text]
    pieces, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(line[:limit])
            line = line[limit:]
        if len(cur) + len(line) > limit and cur:
            pieces.append(cur)
            cur = ""
        cur += line
    if cur:
        pieces.append(cur)
    return pieces


def build_dataset(cfg: DupConfig, out_dir: str, source_dir: str | None = None) -> tuple[str, dict]:
    """Write the derived train set; return (parquet path, description)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from titan_rw.data import EMBEDDED_TRAIN

    src = source_dir or EMBEDDED_TRAIN
    files = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))
    texts, ids, domains = [], [], []
    for f in files:
        t = pq.read_table(os.path.join(src, f), columns=["text", "id", "domain"]).to_pydict()
        for text, doc_id, dom in zip(t["text"], t["id"], t["domain"]):
            parts = [p for p in _split_text(text, cfg.piece_chars) if p.strip()]
            for k, p in enumerate(parts):
                texts.append(p)
                ids.append(doc_id if len(parts) == 1 else f"{doc_id}/p{k}")
                domains.append(dom)
    rng = np.random.default_rng([cfg.seed, 2025])
    n_all = len(texts)
    keep = np.arange(n_all)
    if cfg.max_docs and cfg.max_docs < n_all:
        keep = np.sort(rng.choice(n_all, size=cfg.max_docs, replace=False))
    n = len(keep)
    n_dup = max(1, int(round(cfg.dup_fraction * n))) if cfg.dup_fraction > 0 else 0
    dup_set = set(rng.choice(keep, size=n_dup, replace=False).tolist())

    rows = []  # (text, id, domain, duplicate)
    for i in keep.tolist():
        if i in dup_set:
            for c in range(cfg.copies):
                rows.append((texts[i], ids[i] if c == 0 else f"{ids[i]}#c{c:02d}", domains[i], True))
        else:
            rows.append((texts[i], ids[i], domains[i], False))
    order = rng.permutation(len(rows))
    rows = [rows[j] for j in order]
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "train.parquet")
    table = pa.table({
        "text": [r[0] for r in rows],
        "id": [r[1] for r in rows],
        "domain": [r[2] for r in rows],
        "duplicate": [r[3] for r in rows],
    })
    pq.write_table(table, path)
    chars_dup = sum(len(r[0]) for r in rows if r[3])
    chars_all = sum(len(r[0]) for r in rows)
    info = {
        "path": path,
        "source": src,
        "pieces_total": n_all,
        "pieces_used": n,
        "duplicated_pieces": n_dup,
        "copies": cfg.copies,
        "documents_written": len(rows),
        "duplicate_char_share": chars_dup / max(chars_all, 1),
        "duplicated_ids": sorted(ids[i] for i in dup_set),
    }
    return path, info


def duplicate_ids(path: str) -> set[str]:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["id", "duplicate"]).to_pydict()
    return {i for i, d in zip(t["id"], t["duplicate"]) if d}


def row_dup_share(provenance: list[list[dict]], dup: set[str]) -> np.ndarray:
    """Per row: share of its tokens from duplicated documents (NaN for an empty row)."""
    out = np.full(len(provenance), np.nan)
    for j, docs in enumerate(provenance):
        tot = sum(d["n_tokens"] for d in docs)
        if tot:
            out[j] = sum(d["n_tokens"] for d in docs if d["doc_id"] in dup) / tot
    return out


def fragment_dup_share(provenance: list[list[dict]], dup: set[str], max_documents_per_row: int) -> np.ndarray:
    """[B, max_documents_per_row]: per document fragment of each row, the share of its tokens from
    duplicated documents (0 or 1; mixed only for the last slot of a row with more fragments, where
    the rest are merged like `document_losses` does); NaN for empty slots. Fragment k of a row is
    the row's k-th document in the provenance (row order)."""
    out = np.full((len(provenance), max_documents_per_row), np.nan)
    for j, docs in enumerate(provenance):
        for k in range(min(len(docs), max_documents_per_row)):
            part = docs[k:] if k == max_documents_per_row - 1 else docs[k : k + 1]
            tot = sum(d["n_tokens"] for d in part)
            if tot:
                out[j, k] = sum(d["n_tokens"] for d in part if d["doc_id"] in dup) / tot
    return out

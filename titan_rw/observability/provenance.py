"""On the host: where a step's samples came from. The rows' provenance (the loader's
`last_provenance`) placed in the step's reweighting groups (`GroupLayout`), the per-domain
statistics of a metrics row, and the samples table (the k most / least weighted samples with
their document id, URL and text) of samples.jsonl, TensorBoard's text and W&B's table."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

@dataclass(frozen=True)
class GroupLayout:
    """Where this rank's samples sit in a step's reweighting groups: micro-batch j's group holds
    dp_size · local_samples samples, in DP-rank order, and the step's groups are concatenated."""

    microbatches: int = 1
    local_samples: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    max_documents_per_row: int = 1
    """granularity = "document": a row's samples are its max_documents_per_row fragment slots, and
    local_samples counts slots (rows × slots)."""

    def per_sample(self, provenance: list) -> list:
        """Rows' provenance → one entry per sample: a row's documents go to its fragment slots in
        order (the tail of an overflow row to the last slot, as a list); empty slots get None."""
        F = self.max_documents_per_row
        if F == 1:
            return provenance
        out = []
        for docs in provenance:
            docs = [d for d in (docs or []) if d]
            out.extend(docs[j] if j < len(docs) else None for j in range(F - 1))
            out.append(docs[F - 1] if len(docs) == F else (docs[F - 1:] or None))
        return out

    def provenance_index(self, n_rows: int) -> list[int] | None:
        """Position of each of this rank's rows in the step's groups concatenated: micro-batch j,
        row r -> j·b + dp_rank·b_local + r, b = dp_size·b_local (both scopes). None: the identity."""
        k, b_l = self.microbatches, self.local_samples
        if k == 1 and self.dp_rank == 0:
            return None
        b = b_l * self.dp_size
        return [j * b + self.dp_rank * b_l + r for j in range(k) for r in range(b_l)][:n_rows]



def documents_of(p) -> list[dict]:
    if not p:
        return []
    if isinstance(p, Mapping):
        return [p]
    return [d for d in p if d]


def main_document(p) -> dict:
    """The document with the most tokens in the row (the row may start mid-document)."""
    docs = documents_of(p)
    if not docs:
        return {}
    return max(docs, key=lambda d: d.get("n_tokens", 1))


def domain_stats(prov, idx, weights, valid, group_b) -> dict[str, dict[str, float]]:
    """Per domain over the provenance rows: token share, mean b·w, share of the total weight.

    b is each sample's own group's b (under gradient accumulation in `microbatch` scope every
    micro-batch group's weights sum to 1 on their own), so b·w = 1 is uniform weighting, and the
    weight mass sums b·w: each group's samples count alike, whatever the groups' sizes."""
    share: dict[str, float] = collections.defaultdict(float)
    wsum: dict[str, float] = collections.defaultdict(float)
    rows = 0
    total_w = 0.0
    for i, p in zip(idx, prov):
        docs = documents_of(p)
        if not docs or not valid[i]:
            continue
        rows += 1
        n = sum(max(d.get("n_tokens", 1), 0) for d in docs) or len(docs)
        w = float(weights[i]) * float(group_b[i])  # b·w
        total_w += w
        for d in docs:
            frac = (max(d.get("n_tokens", 1), 0) / n) if n else 1.0 / len(docs)
            dom = str(d.get("domain") or "unknown")
            share[dom] += frac
            wsum[dom] += frac * w
    out = {}
    for dom in sorted(share):
        out[dom] = {
            "share": share[dom] / rows,
            "mean_weight": wsum[dom] / share[dom] if share[dom] else float("nan"),
            "weight_mass": wsum[dom] / total_w if total_w > 0 else float("nan"),
        }
    return out


def domain_stats_documents(prov, idx, weights, valid, scale) -> dict[str, dict[str, float]]:
    """granularity = "document": per domain over this rank's fragments, token-weighted: share of the
    tokens, mean w_d/pi_d (1 = uniform, the token-mean loss), share of the total weight."""
    tok: dict[str, float] = collections.defaultdict(float)
    ratio: dict[str, float] = collections.defaultdict(float)
    mass: dict[str, float] = collections.defaultdict(float)
    for i, p in zip(idx, prov):
        docs = documents_of(p)
        if not docs or not valid[i]:
            continue
        dom = str(main_document(p).get("domain") or "unknown")
        n = float(sum(max(d.get("n_tokens", 1), 0) for d in docs))
        tok[dom] += n
        ratio[dom] += n * float(weights[i]) * float(scale[i])
        mass[dom] += float(weights[i])
    total_t, total_w = sum(tok.values()), sum(mass.values())
    return {dom: {"share": tok[dom] / total_t if total_t else float("nan"),
                  "mean_weight": ratio[dom] / tok[dom] if tok[dom] else float("nan"),
                  "weight_mass": mass[dom] / total_w if total_w > 0 else float("nan")} for dom in sorted(tok)}


def snippet(text: str, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _md_cell(s: Any) -> str:
    return str("" if s is None else s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def samples_markdown(s: dict, which: str) -> str:
    title = "most" if which == "top" else "least"
    lines = [
        f"**{len(s[which])} {title} weighted of {s['rows_seen']} samples with provenance "
        f"(b = {s['b']}{' per group' if isinstance(s['b'], list) else ''})**",
        "",
        "| # | b·w | loss | domain | doc id | url | text |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(s[which], 1):
        lines.append(
            f"| {i} | {x['weight_x_b']:.3f} | {x['loss']:.3f} | {_md_cell(x['domain'])} | "
            f"{_md_cell(x['doc_id'])} | {_md_cell(x['url'])} | {_md_cell(x['text'])} |"
        )
    return "\n".join(lines)


class DocLookup:
    """doc id -> {url, text} from FineWeb-schema parquet (filtered reads, small files only)."""

    def __init__(self, paths: Iterable[str], max_mb: float):
        self.extra = list(paths)
        self.max_bytes = max_mb * 1e6
        self.cache: dict[str, dict] = {}

    def _files(self, shards: Iterable[str | None]) -> list[str]:
        files = []
        for p in list(self.extra) + [s for s in shards if s]:
            if os.path.isdir(p):
                files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".parquet"))
            elif p.endswith(".parquet") and os.path.isfile(p):
                files.append(p)
        return list(dict.fromkeys(files))

    def find(self, ids: set[str], shards: Iterable[str | None]) -> dict[str, dict]:
        missing = {i for i in ids if i not in self.cache}
        if missing:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                return {i: self.cache[i] for i in ids if i in self.cache}
            for f in self._files(shards):
                if not missing or os.path.getsize(f) > self.max_bytes:
                    continue
                try:
                    names = set(pq.ParquetFile(f).schema_arrow.names)
                    if "id" not in names:
                        continue
                    cols = [c for c in ("id", "url", "text") if c in names]
                    t = pq.read_table(f, columns=cols, filters=[("id", "in", sorted(missing))])
                except Exception:  # noqa: BLE001 - lookup is best effort
                    continue
                for r in t.to_pylist():
                    self.cache[r["id"]] = {"url": r.get("url"), "text": (r.get("text") or "")[:4000]}
                    missing.discard(r["id"])
        return {i: self.cache[i] for i in ids if i in self.cache}




class SampleTables:
    """The k most / least weighted samples of a step, ranked by b·w (each sample against uniform
    weight in its own group; documents: w_d/π_d), with the document's id, domain, URL and text: the
    text the model saw (decoded from the step's input tokens) when `decode` is given, else the
    document's text looked up in parquet."""

    def __init__(self, *, top_k: int, snippet_chars: int, lookup: DocLookup, decode=None, max_documents_per_row: int = 1):
        self.top_k = top_k
        self.snippet_chars = snippet_chars
        self.lookup = lookup
        self.decode = decode
        self.max_documents_per_row = max_documents_per_row

    def table(self, step, prov, idx, weights, valid, losses, inputs, group_b, scale) -> dict:
        """One samples.jsonl object: step, b (a list when the groups shown have different b),
        rows_seen (provenance rows or fragments with a valid sample), top, bottom."""
        k = self.top_k
        ok = np.array([valid[i] and bool(documents_of(p)) for i, p in zip(idx, prov)], dtype=bool)
        seen = int(ok.sum())
        if self.max_documents_per_row > 1:  # shown: single documents, not an overflow row's merged tail
            ok &= np.array([not isinstance(p, list) for p in prov], dtype=bool)
        cand = np.nonzero(ok)[0]
        cw, cl = weights[idx[cand]] * scale[idx[cand]], losses[idx[cand]]
        bs = sorted({int(round(x)) for x in group_b[idx[cand]]})  # the b of the groups shown
        # ties (LinUpper saturates every h >= 0 at the same weight): the higher loss ranks first
        top = cand[np.lexsort((-cl, -cw))][:k]
        bottom = cand[np.lexsort((cl, cw))][:k]
        shown = np.concatenate([top, bottom])
        ids = {d["doc_id"] for r in shown for d in [main_document(prov[r])] if d.get("doc_id")}
        found = self.lookup.find(ids, {main_document(prov[r]).get("shard") for r in shown})

        def describe(r):
            d = main_document(prov[r])
            info = found.get(d.get("doc_id"), {})
            text = self._text(prov[r], inputs, r)
            if text is None:
                text = info.get("text", "")
            return {
                "weight": float(weights[idx[r]]),
                # b·w with its own group's b (documents: w_d / pi_d); 1 = uniform weight
                "weight_x_b": float(weights[idx[r]]) * float(scale[idx[r]]),
                "loss": float(losses[idx[r]]),
                "domain": d.get("domain"),
                "doc_id": d.get("doc_id"),
                "url": info.get("url") or d.get("url"),
                "text": snippet(text, self.snippet_chars),
            }

        return {
            "step": int(step),
            "b": bs[0] if len(bs) == 1 else bs,
            "rows_seen": seen,
            "top": [describe(r) for r in top],
            "bottom": [describe(r) for r in bottom],
        }

    def _text(self, p, inputs, r) -> str | None:
        """The sample's own tokens decoded (a fragment's span of its row); None without inputs."""
        if inputs is None or self.decode is None:
            return None
        F = self.max_documents_per_row
        tokens = inputs[r // F]
        if F > 1:  # the fragment's own tokens in its row
            first = documents_of(p)[0]
            off = int(first.get("row_offset", 0))
            tokens = tokens[off: off + sum(int(x.get("n_tokens", 0)) for x in documents_of(p))]
        try:
            return self.decode([int(t) for t in tokens])
        except Exception as ex:  # noqa: BLE001 - a snippet must never stop training
            return f"<decode failed: {ex}>"

#!/usr/bin/env python
"""Build the two tiny local lm-eval tasks shipped in titan_rw/eval/tasks/titan_rw_local/.

Both come from the embedded corpus's *validation* split (titan_rw.data.EMBEDDED_VALIDATION), so a
model trained on the embedded train split never saw them:

  mc.jsonl   titan_rw_local_mc (multiple choice): a passage's opening (~400 characters, cut at a
             word boundary) and 4 candidate continuations (~120 characters): the true one and the
             continuations of 3 passages of *other* documents. Metric: acc / acc_norm.
  ppl.jsonl  titan_rw_local_ppl (rolling loglikelihood): excerpts of validation documents
             (whole fortunes, ~1500-character excerpts of the long domains). Metrics:
             word_perplexity, byte_perplexity, bits_per_byte.

Deterministic (seeded); rerun after the corpus changes:
    python scripts/build_eval_tasks.py [--out titan_rw/eval/tasks/titan_rw_local]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re

import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "titan_rw", "eval", "tasks", "titan_rw_local")
LONG_DOMAINS = ("linux_docs", "python_docs", "wikipedia")


def _validation_docs() -> dict[str, list[dict]]:
    from titan_rw.data import EMBEDDED_VALIDATION

    by_domain: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(EMBEDDED_VALIDATION, "*.parquet"))):
        for row in pq.read_table(path, columns=["text", "id", "domain"]).to_pylist():
            by_domain.setdefault(row["domain"], []).append(row)
    for docs in by_domain.values():
        docs.sort(key=lambda r: r["id"])
    return by_domain


def _clean(text: str) -> str:
    """Collapse runs of blank lines and spaces: the tasks test language, not layout."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n", text)
    return text.strip()


def _cut(text: str, start: int, length: int) -> tuple[str, int]:
    """text[start:start+length] extended to the next space; returns (piece, end index)."""
    end = min(len(text), start + length)
    nxt = text.find(" ", end)
    end = len(text) if nxt < 0 else nxt
    return text[start:end], end


def build_mc(by_domain, rng: random.Random, per_domain: int = 20, ctx_chars: int = 400, cont_chars: int = 120):
    passages = []  # (doc id, domain, context, continuation)
    for domain in LONG_DOMAINS:
        docs = [d for d in by_domain.get(domain, []) if len(_clean(d["text"])) > 3 * (ctx_chars + cont_chars)]
        picks = 0
        for i in range(per_domain * 4):
            if picks >= per_domain or not docs:
                break
            doc = docs[i % len(docs)]
            text = _clean(doc["text"])
            start = rng.randrange(0, len(text) - 2 * (ctx_chars + cont_chars))
            sp = text.find(" ", start)
            if sp < 0:
                continue
            ctx, end = _cut(text, sp + 1, ctx_chars)
            cont, _ = _cut(text, end + 1, cont_chars)
            if len(ctx) < ctx_chars // 2 or len(cont) < cont_chars // 2 or "\n" in cont[-1:]:
                continue
            passages.append((doc["id"], domain, ctx, cont))
            picks += 1
    items = []
    for k, (doc_id, domain, ctx, cont) in enumerate(passages):
        others = [p[3] for p in passages if p[0] != doc_id]
        choices = [cont] + rng.sample(others, 3)
        order = list(range(4))
        rng.shuffle(order)
        items.append({
            "id": f"mc-{k:03d}",
            "domain": domain,
            "source_id": doc_id,
            "context": ctx,
            "choices": [choices[j] for j in order],
            "label": order.index(0),
        })
    return items


def build_ppl(by_domain, rng: random.Random, fortunes: int = 8, per_long_domain: int = 4, chars: int = 1500):
    items = []
    for doc in rng.sample(by_domain.get("fortunes", []), min(fortunes, len(by_domain.get("fortunes", [])))):
        items.append({"id": f"ppl-{len(items):03d}", "domain": "fortunes", "source_id": doc["id"], "text": _clean(doc["text"])})
    for domain in LONG_DOMAINS:
        docs = [d for d in by_domain.get(domain, []) if len(_clean(d["text"])) > 2 * chars]
        for doc in rng.sample(docs, min(per_long_domain, len(docs))):
            text = _clean(doc["text"])
            start = rng.randrange(0, len(text) - chars)
            sp = text.find(" ", start)
            piece, _ = _cut(text, sp + 1, chars)
            items.append({"id": f"ppl-{len(items):03d}", "domain": domain, "source_id": doc["id"], "text": piece})
    return items


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    by_domain = _validation_docs()
    os.makedirs(a.out, exist_ok=True)
    mc = build_mc(by_domain, random.Random(a.seed))
    ppl = build_ppl(by_domain, random.Random(a.seed + 1))
    write_jsonl(os.path.join(a.out, "mc.jsonl"), mc)
    write_jsonl(os.path.join(a.out, "ppl.jsonl"), ppl)
    print(f"{a.out}: mc.jsonl {len(mc)} items, ppl.jsonl {len(ppl)} documents "
          f"({sum(len(r['text']) for r in ppl):,} characters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

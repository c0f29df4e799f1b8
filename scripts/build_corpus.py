#!/usr/bin/env python
"""Build the embedded corpus shipped in titan_rw/assets/corpus (run once by a maintainer).

Real English text that exists offline on a Debian machine with PyPI access, converted to
FineWeb-schema parquet (`text, id, dump, url, date, file_path, language, language_score,
token_count`, plus `domain`), split into train / validation by a seeded hash of the document id:

  python_docs  Debian `python3.11-doc`  /usr/share/doc/python3.11/html/_sources/**/*.rst.txt  (PSF-2.0)
  linux_docs   Debian `linux-doc-6.1`   /usr/share/doc/linux-doc-6.1/Documentation/**/*.{rst,txt}.gz (GPL-2.0)
  wikipedia    gensim wheel test data   enwiki-latest-pages-articles1.xml-...-shortened.bz2 (CC BY-SA 3.0)
  fortunes     Debian `fortunes`, `fortunes-min`  /usr/share/games/fortunes/*  (BSD fortune data)

Prerequisites (they upgrade some system packages: do this on a scratch machine, not a user's):
  apt-get update && apt-get install -y python3.11-doc linux-doc-6.1 fortunes fortunes-min
  pip download --no-deps gensim==4.4.0 -d /tmp/gensim_whl

Then:
  python scripts/build_corpus.py --gensim-wheel /tmp/gensim_whl/gensim-4.4.0-*.whl
  titan-rw tokenizer train --input titan_rw/assets/corpus/train --output titan_rw/assets/tokenizer \
      --vocab-size 2048
  python scripts/build_corpus.py --gensim-wheel ... --tokenizer titan_rw/assets/tokenizer  # fills token_count

Selection is deterministic (sorted files, seeded shuffle, a byte budget per domain).
"""

from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import hashlib
import html
import random
import re
import sys
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "titan_rw" / "assets" / "corpus"
DUMP = "titan-rw-embedded-v1"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MAX_DOC_CHARS = 48_000  # cut very long pages at a paragraph boundary (some still exceed seq_len)

SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("id", pa.string()),
        ("dump", pa.string()),
        ("url", pa.string()),
        ("date", pa.string()),
        ("file_path", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        ("token_count", pa.int64()),
        ("domain", pa.string()),
    ]
)


def _clip(text: str) -> str:
    text = text.strip("\n")
    if len(text) <= MAX_DOC_CHARS:
        return text
    cut = text.rfind("\n\n", 0, MAX_DOC_CHARS)
    return text[: cut if cut > MAX_DOC_CHARS // 2 else MAX_DOC_CHARS]


def _doc(domain: str, text: str, url: str, file_path: str, date: str) -> dict:
    text = _clip(text)
    digest = hashlib.sha1(f"{domain}\0{url}".encode()).hexdigest()
    return {
        "text": text,
        "id": f"<urn:titan-rw:{domain}:{digest[:24]}>",
        "dump": DUMP,
        "url": url,
        "date": date,
        "file_path": file_path,
        "language": "en",
        "language_score": 1.0,  # no language classifier was run: every source is English
        "token_count": 0,
        "domain": domain,
    }


def python_docs(budget: int, rng: random.Random) -> list[dict]:
    root = Path("/usr/share/doc/python3.11/html/_sources")
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        sys.exit(f"{root}: not found; apt-get install python3.11-doc")
    rng.shuffle(files)
    docs, used = [], 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("whatsnew/changelog", "genindex")):
            continue
        text = f.read_text(encoding="utf-8", errors="strict")
        if len(text) < 500:
            continue
        url = "https://docs.python.org/3.11/" + rel[: -len(".rst.txt")] + ".html"
        docs.append(_doc("python_docs", text, url, str(f), "2023-06-06"))
        used += len(docs[-1]["text"])
        if used >= budget:
            break
    return docs


def linux_docs(budget: int, rng: random.Random) -> list[dict]:
    root = Path("/usr/share/doc/linux-doc-6.1/Documentation")
    files = sorted(list(root.rglob("*.rst.gz")) + list(root.rglob("*.txt.gz")))
    if not files:
        sys.exit(f"{root}: not found; apt-get install linux-doc-6.1")
    rng.shuffle(files)
    docs, used = [], 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("translations/", "ABI/")):  # non-English / terse sysfs tables
            continue
        try:
            text = gzip.decompress(f.read_bytes()).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) < 500:
            continue
        url = "https://www.kernel.org/doc/html/v6.1/" + re.sub(r"\.(rst|txt)\.gz$", ".html", rel)
        docs.append(_doc("linux_docs", text, url, str(f), "2022-12-11"))
        used += len(docs[-1]["text"])
        if used >= budget:
            break
    return docs


_WIKI_DROP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.S), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(s: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(s):
        two = s[i : i + 2]
        if two in ("{{", "{|"):
            depth += 1
            i += 2
        elif two in ("}}", "|}") and depth:
            depth -= 1
            i += 2
        else:
            if depth == 0:
                out.append(s[i])
            i += 1
    return "".join(out)


def wiki_to_text(markup: str) -> str:
    s = _strip_templates(markup)
    for pat, rep in _WIKI_DROP:
        s = pat.sub(rep, s)
    s = html.unescape(s)
    # drop the trailing reference / link sections
    s = re.split(r"\n(?:See also|References|External links|Further reading|Notes)\s*\n", s)[0]
    return s.strip()


def wikipedia(budget: int, rng: random.Random, wheel: str) -> list[dict]:
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read(WIKI_MEMBER))
    root = ET.fromstring(raw)
    ns = {"m": root.tag.split("}")[0].strip("{")}
    pages = []
    for page in root.findall("m:page", ns):
        title = page.findtext("m:title", namespaces=ns) or ""
        text = page.findtext("m:revision/m:text", namespaces=ns) or ""
        if page.find("m:redirect", ns) is not None or ":" in title or text.lstrip().lower().startswith("#redirect"):
            continue
        body = wiki_to_text(text)
        if len(body) < 1000:
            continue
        pages.append((title, body))
    rng.shuffle(pages)
    docs, used = [], 0
    for title, body in pages:
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        docs.append(_doc("wikipedia", title + "\n\n" + body, url, f"{wheel}!{WIKI_MEMBER}", "2017-03-01"))
        used += len(docs[-1]["text"])
        if used >= budget:
            break
    return docs


def fortunes(budget: int, rng: random.Random) -> list[dict]:
    root = Path("/usr/share/games/fortunes")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.name not in ("ascii-art", "art"))
    if not files:
        sys.exit(f"{root}: not found; apt-get install fortunes fortunes-min")
    items = []
    for f in files:
        raw = f.read_bytes().decode("utf-8", errors="replace")
        for n, item in enumerate(raw.split("\n%\n")):
            item = item.strip("\n%")
            if len(item) >= 40 and "\ufffd" not in item:
                items.append((f, n, item))
    rng.shuffle(items)
    docs, used = [], 0
    for f, n, item in items:
        docs.append(_doc("fortunes", item, f"fortune://{f.name}/{n}", str(f), "2020-01-01"))
        used += len(item)
        if used >= budget:
            break
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gensim-wheel", required=True, help="gensim-4.4.0 wheel (pip download --no-deps gensim)")
    p.add_argument("--output", default=str(OUT))
    p.add_argument("--tokenizer", default=None, help="fill token_count with this sentencepiece model")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--validation-fraction", type=float, default=0.08)
    p.add_argument("--mb", type=float, nargs=4, default=[2.6, 2.6, 2.4, 0.7],
                   metavar=("PY", "LINUX", "WIKI", "FORTUNES"), help="text budget per domain, MB")
    a = p.parse_args(argv)
    wheel = sorted(glob.glob(a.gensim_wheel))[-1]
    mb = [int(x * 1e6) for x in a.mb]
    domains = {
        "python_docs": python_docs(mb[0], random.Random(a.seed)),
        "linux_docs": linux_docs(mb[1], random.Random(a.seed + 1)),
        "wikipedia": wikipedia(mb[2], random.Random(a.seed + 2), wheel),
        "fortunes": fortunes(mb[3], random.Random(a.seed + 3)),
    }
    tok = None
    if a.tokenizer:
        sys.path.insert(0, str(REPO))
        from titan_rw.data.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(tokenizer_path=a.tokenizer)
    out = Path(a.output)
    for split in ("train", "validation"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for name, docs in domains.items():
        if tok is not None:
            for d, ids in zip(docs, tok.encode_batch([d["text"] for d in docs], add_bos=False, add_eos=False)):
                d["token_count"] = len(ids)
        splits = {"train": [], "validation": []}
        for d in docs:
            h = int(hashlib.sha256(f"{a.seed}:{d['id']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            splits["validation" if h < a.validation_fraction else "train"].append(d)
        for split, rows in splits.items():
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            path = out / split / f"{name}.parquet"
            pq.write_table(table, path, compression="zstd", compression_level=19, row_group_size=256)
            print(f"{split:10s} {name:12s} docs={len(rows):6d} chars={sum(len(r['text']) for r in rows):9d} "
                  f"file={path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

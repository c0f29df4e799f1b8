"""The opt-in disk cache of tokenized parquet (`TITAN_RW_TOKEN_CACHE_DIR`, titan_rw.data.token_cache):
what a later process reads back is what tokenizing gives (checked against sentencepiece called
directly), a changed file is tokenized again, a damaged entry is ignored, and unset it writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm

import titan_rw  # noqa: F401  (compat patches before torchtitan)
from titan_rw.data import DEFAULT_TOKENIZER, streaming, token_cache
from titan_rw.data.tokenizer import SentencePieceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["the first document", None, "", "zweites Dokument über Bäume", b"\xff\xfe bad", "third one"]


def _write(path, texts):
    col = pa.array([t.encode() if isinstance(t, str) else t for t in texts], type=pa.binary())
    pq.write_table(pa.table({"text": col, "domain": ["a", "a", "b", "b", "b", "c"][: len(texts)]}), path)


def _expected(texts):
    """Independently: sentencepiece itself, BOS + ids + EOS per usable document, concatenated."""
    sp = spm.SentencePieceProcessor(model_file=DEFAULT_TOKENIZER)
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    ids = [[sp.bos_id(), *sp.encode(t), sp.eos_id()] for t in docs]
    return np.array([i for d in ids for i in d]), np.cumsum([len(d) for d in ids])


def _open(path, monkeypatch, cache):
    if cache is None:
        monkeypatch.delenv(token_cache.ENV, raising=False)
    else:
        monkeypatch.setenv(token_cache.ENV, str(cache))
    streaming._CACHE.clear()  # the in-process cache would answer before the disk
    tok = SentencePieceTokenizer.Config().build(tokenizer_path=DEFAULT_TOKENIZER)
    return streaming.open_parquet_source(str(path), tok)


def test_an_entry_read_back_in_another_process_is_what_tokenizing_gives(tmp_path, monkeypatch):
    data, cache = tmp_path / "d.parquet", tmp_path / "cache"
    _write(data, TEXTS)
    tokens, ends = _expected(TEXTS)
    src = _open(data, monkeypatch, cache)
    (part,) = src.parts
    assert np.array_equal(part.tokens, tokens) and np.array_equal(part.doc_ends, ends)
    assert (src.read_stats.documents, src.read_stats.empty, src.read_stats.invalid_utf8) == (3, 2, 1)
    assert len(list(cache.glob("*.npz"))) == 1
    # a fresh process whose tokenizer cannot encode: it must read everything from the entry
    code = (
        "import json, sys, numpy as np\n"
        "import titan_rw\n"
        "from titan_rw.data import DEFAULT_TOKENIZER, streaming\n"
        "from titan_rw.data.tokenizer import SentencePieceTokenizer as T\n"
        "def refuse(*a, **k): raise AssertionError('tokenized although cached')\n"
        "T.encode_batch = T.encode = refuse\n"
        "src = streaming.open_parquet_source(sys.argv[1], T.Config().build(tokenizer_path=DEFAULT_TOKENIZER))\n"
        "p = src.parts[0]; s = src.read_stats\n"
        "print(json.dumps([p.tokens.tolist(), p.doc_ends.tolist(), p.domain_codes.tolist(), p.domain_names, p.ids,\n"
        "                  [s.documents, s.empty, s.invalid_utf8, s.skipped_examples]]))\n"
    )
    env = dict(os.environ, **{token_cache.ENV: str(cache)}, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, str(data)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    s = src.read_stats
    assert got == [tokens.tolist(), ends.tolist(), part.domain_codes.tolist(), part.domain_names, part.ids,
                   [s.documents, s.empty, s.invalid_utf8, s.skipped_examples]]
    assert got[3] == ["a", "b", "c"] and got[2] == [0, 1, 2]


def test_a_changed_file_is_tokenized_again_and_a_damaged_entry_ignored(tmp_path, monkeypatch, caplog):
    data, cache = tmp_path / "d.parquet", tmp_path / "cache"
    _write(data, TEXTS)
    _open(data, monkeypatch, cache)
    other = ["another text entirely", "and more", "x", "y", "z", "w"]
    _write(data, other)  # same path, new bytes
    part = _open(data, monkeypatch, cache).parts[0]
    assert np.array_equal(part.tokens, _expected(other)[0])
    assert len(list(cache.glob("*.npz"))) == 2
    for entry in cache.glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:100])  # torn
    part = _open(data, monkeypatch, cache).parts[0]
    assert np.array_equal(part.tokens, _expected(other)[0])
    assert "token cache: ignoring unreadable" in caplog.text
    assert np.array_equal(_open(data, monkeypatch, cache).parts[0].tokens, _expected(other)[0])  # rewritten whole


def test_unset_nothing_is_written(tmp_path, monkeypatch):
    data = tmp_path / "d.parquet"
    _write(data, TEXTS)
    monkeypatch.chdir(tmp_path)
    part = _open(data, monkeypatch, None).parts[0]
    assert np.array_equal(part.tokens, _expected(TEXTS)[0])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d.parquet"]


def test_the_suite_shares_one_cache():
    """tests/conftest.py sets the variable for every process the suite starts (the shipped corpus is
    tokenized once, not in each of a few hundred trainer processes)."""
    assert os.environ.get(token_cache.ENV)

"""SentencePieceTokenizer (TorchTitan BaseTokenizer), tokenizer training, the shipped corpus."""

from __future__ import annotations

import glob
import os

import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

import titan_rw  # noqa: F401
from test_data_helpers import write_docs_parquet
from titan_rw.data import DEFAULT_TOKENIZER, EMBEDDED_CORPUS, EMBEDDED_TRAIN, EMBEDDED_VALIDATION
from titan_rw.data.parquet import read_texts
from titan_rw.data.tokenizer import SentencePieceTokenizer

TRICKY = ["", " leading space", "trailing  \n\n", "\ttabs\tand  double  spaces", "naïve café — “quotes”",
          "日本語のテキスト", "emoji 😀🚀", "a\r\nwindows\r\n", "x = {'k': [1, 2, 3]}\n    return 42", "\x00\x07 ctrl"]


def test_trainer_style_build_and_contract():
    from torchtitan.components.tokenizer import BaseTokenizer

    cfg = SentencePieceTokenizer.Config()
    assert isinstance(cfg, BaseTokenizer.Config)
    by_dir = cfg.build(tokenizer_path=os.path.dirname(DEFAULT_TOKENIZER))  # Trainer: hf_assets_path
    by_file = cfg.build(tokenizer_path=DEFAULT_TOKENIZER)
    by_field = SentencePieceTokenizer.Config(model_path=DEFAULT_TOKENIZER).build(tokenizer_path="./ignored")
    for tok in (by_dir, by_file, by_field):
        assert isinstance(tok, BaseTokenizer)
        assert tok.get_vocab_size() == 2048  # the debug Llama's vocab
        assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = by_dir.encode("hello world", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert by_dir.encode("hello world", add_bos=False, add_eos=False) == ids[1:-1]
    assert by_dir.decode(ids) == "hello world"
    assert by_dir.fingerprint.endswith(by_dir.sha256[:16])


@pytest.mark.parametrize("text", TRICKY)
def test_shipped_tokenizer_round_trips_exactly(text):
    tok = SentencePieceTokenizer(tokenizer_path=DEFAULT_TOKENIZER)
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text), default=0) < 2048


def test_round_trip_on_real_corpus_subset():
    tok = SentencePieceTokenizer(tokenizer_path=DEFAULT_TOKENIZER)
    texts = list(read_texts(os.path.join(EMBEDDED_VALIDATION, "fortunes.parquet")))[:200]
    texts += [t[:5000] for t in read_texts(os.path.join(EMBEDDED_VALIDATION, "python_docs.parquet"))]
    enc = tok.encode_batch(texts, add_bos=False, add_eos=False)
    assert [tok.decode(e) for e in enc] == texts
    chars = sum(map(len, texts))
    assert chars / sum(map(len, enc)) > 2.0  # it compresses: a real vocabulary, not bytes


def test_llama2_style_tokenizer_model_works_as_is(tmp_path):
    """A model trained with Llama-2's settings (unk 0, bos 1, eos 2, no pad, dummy prefix),
    saved as DIR/tokenizer.model, the layout of a Llama-2 checkpoint."""
    texts = list(read_texts(os.path.join(EMBEDDED_VALIDATION, "fortunes.parquet")))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    tok = SentencePieceTokenizer.Config().build(tokenizer_path=str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.get_vocab_size()) == (1, 2, None, 400)
    ids = tok.encode("The quick brown fox.")
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "The quick brown fox."


def test_bad_tokenizer_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SentencePieceTokenizer(tokenizer_path=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        SentencePieceTokenizer(tokenizer_path=str(tmp_path / "empty"))
    (tmp_path / "junk.model").write_bytes(b"definitely not a model")
    with pytest.raises(ValueError, match="junk.model"):
        SentencePieceTokenizer(tokenizer_path=str(tmp_path / "junk.model"))


def test_tokenizer_train_cli(tmp_path, capsys):
    from titan_rw.data.cli import tokenizer_train_main

    with pytest.raises(SystemExit) as e:
        tokenizer_train_main(["--help"])
    assert e.value.code == 0
    src = os.path.join(EMBEDDED_VALIDATION, "wikipedia.parquet")
    write_docs_parquet(str(tmp_path / "extra.parquet"), ["", "Zebra stripes ąčę 1234567."])
    rc = tokenizer_train_main(["--input", src, str(tmp_path / "extra.parquet"), "--output", str(tmp_path / "tk"),
                               "--vocab-size", "512"])
    assert rc == 0
    assert "1 skipped" in capsys.readouterr().out
    tok = SentencePieceTokenizer(tokenizer_path=str(tmp_path / "tk"))
    assert tok.get_vocab_size() == 512
    for t in TRICKY + ["Zebra stripes ąčę 1234567."]:
        assert tok.decode(tok.encode(t)) == t
    rc = tokenizer_train_main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "tk2")])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_embedded_corpus_shape():
    cols = ["text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count", "domain"]
    total_bytes = 0
    ids = {}
    domains = {}
    for split in ("train", "validation"):
        files = sorted(glob.glob(os.path.join(EMBEDDED_CORPUS, split, "*.parquet")))
        assert files, split
        for f in files:
            total_bytes += os.path.getsize(f)
            t = pq.read_table(f)
            assert t.schema.names == cols, f
            ids[split] = ids.get(split, set()) | set(t.column("id").to_pylist())
            for d in t.column("domain").to_pylist():
                domains.setdefault(split, set()).add(d)
    assert total_bytes <= 6 * 2**20
    assert len(domains["train"]) >= 3 and domains["validation"] == domains["train"]
    assert not ids["train"] & ids["validation"], "validation split must be held out"
    assert os.path.exists(os.path.join(EMBEDDED_CORPUS, "LICENSES.md"))
    assert EMBEDDED_TRAIN.endswith("train")

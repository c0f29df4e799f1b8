"""User errors are one line and exit 2, before the model is built where the data allows (issue 24,
docs/data.md "Bad input", docs/design.md §3): the real `python -m titan_rw.train` entry point (and
`titan-rw train --nproc 2`, `python -m titan_rw.torchrun`) as a subprocess, on real parquet, token
shards and tokenizer files made here.

Each case checks the exit code, that the output holds the one line (what, where, what to do) once
and no "Traceback", and, where the data allows an early check, that no model-building log line
("Building llama ...", "Building device mesh ...") was printed.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_data_helpers import write_shard
from titan_rw.data import DEFAULT_TOKENIZER, EMBEDDED_TRAIN

from helpers import ROOT, subprocess_env  # noqa: E402
COMMON = [
    "--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny", "--training.steps", "1",
    "--training.seq_len", "32", "--training.local_batch_size", "4", "--training.global_batch_size", "8",
    "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false",
]
BUILT = ("Building llama", "Building device mesh")  # TorchTitan's log lines while the model is built


def _env(tmp):
    return subprocess_env(tmp, drop=("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE",
                                      "TORCHELASTIC_RESTART_COUNT"))


def _train(tmp, *args, launcher=("-m", "titan_rw.train"), common=True, expect=2):
    cmd = [sys.executable, *launcher, *(COMMON if common else []),
           *(["--job.dump_folder", str(tmp / "run")] if common else []), *args]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == expect, f"exit {out.returncode} (expected {expect})\n{log[-6000:]}"
    assert "Traceback" not in log, log[-6000:]
    return log


def _the_line(log, *needles):
    """The one output line holding every needle (there must be exactly one)."""
    lines = [ln for ln in log.splitlines() if all(n in ln for n in needles)]
    assert len(lines) == 1, (needles, log[-4000:])
    return lines[0]


def _not_built(log):
    for s in BUILT:
        assert s not in log, (s, log[-4000:])


# ---------------------------------------------------------------------------- the input data
def test_every_text_null_stops_before_the_model(tmp_path):
    """Every text null, in a dataset of two files: a string column of nulls, and pandas' untyped
    all-None column (parquet type null). Today `DataError: allnull` after the model is built (108
    lines)."""
    data = tmp_path / "allnull"
    data.mkdir()
    for name, text in (("a", pa.array([None] * 30, pa.string())), ("b", pa.array([None] * 10))):
        pq.write_table(pa.table({"text": text, "id": [f"{name}{i}" for i in range(len(text))]}), str(data / f"{name}.parquet"))
    log = _train(tmp_path, "--data.dataset_path", str(data))
    line = _the_line(log, "every 'text' value is null")
    assert line.startswith(f"titan_rw: config error: data.dataset_path: {data}:")
    assert "40 rows in 2 parquet file(s)" in line and "point the loader at another dataset" in line
    _not_built(log)


@pytest.mark.slow
def test_shards_of_another_tokenizer_stop_before_the_model_on_two_ranks(tmp_path):
    """Token shards whose metadata names another tokenizer, `titan-rw train --nproc 2`: today a
    traceback per rank after the model is built and torchrun's report (220 lines)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(str(shards / f"s{i}.ds"), [rng.integers(3, 2000, 300) for _ in range(3)], token_size=2,
                    tokenizer="/elsewhere/other_tokenizer.model#sha256=0123456789abcdef")
    titan_rw = os.path.join(os.path.dirname(sys.executable), "titan-rw")
    cmd = [titan_rw, "train", "--nproc", "2", *COMMON, "--job.dump_folder", str(tmp_path / "run"),
           "--data.dataset_path", str(shards)]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in log, log[-6000:]
    line = _the_line(log, "tokenized with")
    assert line.startswith("titan_rw: config error: data.dataset_path:")
    assert f"{shards}/s0.ds" in line and "/elsewhere/other_tokenizer.model" in line
    assert DEFAULT_TOKENIZER in line and "re-tokenize" in line and "data.tokenizer" in line
    _not_built(log)
    assert not (tmp_path / "run").exists()  # nothing was created


@pytest.mark.slow
def test_data_found_bad_only_when_tokenized_is_one_line_on_two_ranks(tmp_path):
    """What needs tokenizing to be seen (every text empty, not null) is found when the loader is
    built, after the model: still one line (rank 0's), exit 2, under the launcher that launch/ and
    slurm/ use, without torchrun's error report."""
    path = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"text": ["", "   ", "\n\n"] * 20}), str(path))
    log = _train(tmp_path, "--data.dataset_path", str(path),
                 launcher=("-m", "titan_rw.torchrun", "--standalone", "--nproc_per_node=2", "-m", "titan_rw.train"))
    line = _the_line(log, "empty dataset")
    assert line.startswith("titan_rw: data error: blank: empty dataset") and str(path) in line
    assert "60 document(s) skipped" in line
    assert "ChildFailedError" not in log and "Root Cause" not in log


@pytest.mark.slow
def test_skipped_empty_texts_are_one_count_line(tmp_path):
    """A dataset with 267 empty texts (null, "" and whitespace) among real documents trains, and
    says so in one count line, not one warning per document (today 305 lines for 267 rows)."""
    docs = pq.read_table(os.path.join(EMBEDDED_TRAIN, "wikipedia.parquet"), columns=["text"]).column(0).to_pylist()[:40]
    rows = docs + [None, "", " \n "] * 89
    texts = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # blanks among the documents
    assert len(texts) == 40 + 267
    path = tmp_path / "some_empty.parquet"
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), str(path))
    log = _train(tmp_path, "--data.dataset_path", str(path), "--data.format", "parquet", expect=0)
    line = _the_line(log, "skipped 267 documents")
    assert str(path) in line and "(267 empty, 0 invalid UTF-8)" in line
    assert not [ln for ln in log.splitlines() if "skipping" in ln], log[-4000:]


# ---------------------------------------------------------------------------- the config file
def test_config_path_that_is_a_folder_or_a_binary_file(tmp_path):
    """Today `IsADirectoryError` / `UnicodeDecodeError` tracebacks. The binary file through the CLI,
    the folder (the same code path to the one line) through the config loader."""
    from titan_rw import config as C

    png = tmp_path / "run.toml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    log = _train(tmp_path, "--config", str(png), common=False)
    line = _the_line(log, "not a text file")
    assert line.startswith(f"titan_rw: config error: {png}: not a text file (byte 0 is not UTF-8)") and "TOML file" in line
    with pytest.raises(C.ConfigError, match=f"^{tmp_path}: is a folder, not a config file: pass --config a TOML file"):
        C.from_args(str(tmp_path))


# ---------------------------------------------------------------------------- the tokenizer
def test_tokenizer_that_is_not_sentencepiece_says_what_it_is(tmp_path):
    """Today: "not a readable sentencepiece model (INTERNAL: could not parse ModelProto ...)". Llama 3's
    tokenizer.model (tiktoken: base64 piece and rank per line) in a model folder."""
    folder = tmp_path / "llama3"
    folder.mkdir()
    (folder / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    log = _train(tmp_path, "--data.tokenizer", str(folder))
    line = _the_line(log, "tiktoken")
    assert line.startswith("titan_rw: config error:") and f"data.tokenizer '{folder}'" in line
    assert "not a sentencepiece model" in line and "not a readable" not in line
    assert "use a sentencepiece .model file" in line
    _not_built(log)


def test_tokenizer_file_diagnosis(tmp_path):
    """The other usual wrong files, through the real tokenizer class (no subprocess): a truncated copy
    of the shipped model, a Hugging Face tokenizer.json (a file, or the only tokenizer of a folder),
    a .vocab file, an empty file, other text."""
    from titan_rw.data.tokenizer import SentencePieceTokenizer

    with open(DEFAULT_TOKENIZER, "rb") as fh:
        model = fh.read()
    (tmp_path / "cut.model").write_bytes(model[: len(model) // 3])
    with pytest.raises(ValueError, match=r"cut\.model: is not a sentencepiece model: its bytes do not parse as one \(a truncated"):
        SentencePieceTokenizer(tokenizer_path=str(tmp_path / "cut.model"))
    cases = {
        "tokenizer.json": ('{"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {}}}',
                           "is a Hugging Face tokenizer.json"),
        "tok.vocab": ("<unk>\t0\n<s>\t0\n</s>\t0\n▁t\t-0\n", "is a sentencepiece .vocab file"),
        "empty.model": ("", "is empty (0 bytes)"),
        "notes.model": ("just some words\n", "is a text file"),
    }
    for name, (text, want) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as e:
            SentencePieceTokenizer(tokenizer_path=str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: {want}"), str(e.value)
        assert "\n" not in str(e.value)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text(cases["tokenizer.json"][0])
    with pytest.raises(FileNotFoundError, match="tokenizer.json here is a Hugging Face tokenizer"):
        SentencePieceTokenizer(tokenizer_path=str(hf))

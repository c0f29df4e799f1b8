"""`titan-rw tokenize`: the real datatrove pipeline on real parquet; bad inputs."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import titan_rw  # noqa: F401
from test_data_helpers import real_shards, write_docs_parquet  # noqa: F401
from titan_rw.data import DEFAULT_TOKENIZER, EMBEDDED_CORPUS
from titan_rw.data.parquet import DataError, ReadStats, iter_parquet_documents
from titan_rw.data.shards import open_shard, read_metadata
from titan_rw.data.tokenize import run_tokenize


def _invalid_utf8_string_array(values: list[bytes]) -> pa.Array:
    """A `string` column holding bytes that are not UTF-8 (as a buggy writer could produce)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    data = b"".join(values)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])


def test_embedded_corpus_end_to_end(real_shards):
    out, tok = real_shards
    files = sorted(glob.glob(os.path.join(EMBEDDED_CORPUS, "*", "*.parquet")))
    assert len(files) == 8
    shards = sorted(glob.glob(os.path.join(out, "*.ds")))
    assert len(shards) == len(files)  # one task per input file, files in sorted order
    total = 0
    for f, s in zip(files, shards):
        table = pq.read_table(f, columns=["text", "id", "domain", "token_count"])
        part = open_shard(s, tok)
        meta = read_metadata(s)
        assert meta.tokenizer == tok.fingerprint and meta.token_size == 2
        assert meta.token_count == part.n_tokens == int(part.doc_ends[-1])
        assert part.n_docs == table.num_rows
        starts = np.concatenate([[0], part.doc_ends[:-1]])
        # the first document decodes to its parquet text
        first = np.asarray(part.tokens[: part.doc_ends[0]])
        assert tok.decode(first) == table.column("text")[0].as_py()
        # every document is BOS ... EOS and its length is the tokenizer's count + 2
        assert np.all(part.tokens[starts] == tok.bos_id)
        assert np.all(part.tokens[part.doc_ends - 1] == tok.eos_id)
        lengths = np.diff(np.concatenate([[0], part.doc_ends]))
        assert np.array_equal(lengths, table.column("token_count").to_numpy() + 2)
        # provenance sidecar is aligned with the documents
        assert part.doc_id(3) == table.column("id")[3].as_py()
        assert part.domain(3, "?") == table.column("domain")[3].as_py()
        total += part.n_tokens
    stats_total = sum(pq.read_table(f, columns=["token_count"]).column(0).to_numpy().sum() + pq.read_metadata(f).num_rows * 2
                      for f in files)
    assert total == stats_total


def test_resumable_reruns_only_unfinished_tasks(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        write_docs_parquet(str(src / f"p{i}.parquet"), [f"document {i}.{j} " * 5 for j in range(20)])
    out = str(tmp_path / "out")
    shards = run_tokenize(str(src), out, DEFAULT_TOKENIZER, progress=False)
    assert len(shards) == 3
    mtimes = {s: os.stat(s).st_mtime_ns for s in shards}
    completions = sorted(glob.glob(os.path.join(out, ".datatrove", "completions", "*")))
    assert len(completions) == 3
    os.remove(shards[1])  # a task that died mid-way: no completion marker, partial output
    os.remove(completions[1])
    run_tokenize(str(src), out, DEFAULT_TOKENIZER, progress=False)
    assert os.stat(shards[0]).st_mtime_ns == mtimes[shards[0]]  # not redone
    assert os.stat(shards[2]).st_mtime_ns == mtimes[shards[2]]
    assert os.path.exists(shards[1]) and read_metadata(shards[1]).token_count > 0


def test_bad_documents_are_skipped_and_counted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    texts = _invalid_utf8_string_array([b"good one", b"bad \xff\xfe bytes", b"", b"   \n", "caf\u00e9".encode()])
    pq.write_table(pa.table({"text": texts, "id": ["a", "b", "c", "d", "e"]}), str(src / "x.parquet"))
    stats = ReadStats()
    docs = list(iter_parquet_documents(str(src / "x.parquet"), stats=stats))
    assert [d[1] for d in docs] == ["a", "e"]
    assert (stats.invalid_utf8, stats.empty) == (1, 2)
    assert any("x.parquet row 1" in s for s in stats.skipped_examples)
    out = str(tmp_path / "out")
    (shard,) = run_tokenize(str(src), out, DEFAULT_TOKENIZER, progress=False)
    assert open_shard(shard).n_docs == 2
    import json

    stats_json = json.load(open(os.path.join(out, ".datatrove", "stats.json")))
    reader = stats_json[0]["stats"]

    def total(v):
        return v["total"] if isinstance(v, dict) else v

    assert total(reader["invalid_utf8"]) == 1 and total(reader["empty"]) == 2


def test_truncated_parquet_names_the_file(tmp_path):
    p = write_docs_parquet(str(tmp_path / "trunc.parquet"), ["some text"] * 100)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.parquet"):
        run_tokenize(str(tmp_path), str(tmp_path / "out"), DEFAULT_TOKENIZER, progress=False)
    open(p, "wb").write(b"not parquet at all")
    with pytest.raises(DataError, match="trunc.parquet"):
        list(iter_parquet_documents(p))


def test_missing_text_column_names_the_file(tmp_path):
    pq.write_table(pa.table({"content": ["x"], "id": ["1"]}), str(tmp_path / "notext.parquet"))
    with pytest.raises(DataError, match=r"notext\.parquet: no 'text' column"):
        run_tokenize(str(tmp_path), str(tmp_path / "out"), DEFAULT_TOKENIZER, progress=False)


def test_no_input_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        run_tokenize(str(tmp_path / "empty"), str(tmp_path / "out"), DEFAULT_TOKENIZER, progress=False)


def test_cli_tokenize_and_help(tmp_path, capsys):
    from titan_rw.data.cli import tokenize_main

    with pytest.raises(SystemExit) as e:
        tokenize_main(["--help"])
    assert e.value.code == 0 and "--slurm" in capsys.readouterr().out
    src = write_docs_parquet(str(tmp_path / "a.parquet"), ["hello world " * 10] * 5)
    assert tokenize_main(["--input", src, "--output", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "1 shards" in capsys.readouterr().out
    rc = tokenize_main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_streaming_bad_inputs(tmp_path):
    from titan_rw.data.loader import TokenDataLoader

    def build(path):
        return TokenDataLoader.Config(dataset_path=path).build(
            dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=32, local_batch_size=1)

    pq.write_table(pa.table({"body": ["x"]}), str(tmp_path / "nt.parquet"))
    with pytest.raises(DataError, match=r"nt\.parquet: no 'text' column"):
        build(str(tmp_path / "nt.parquet"))
    write_docs_parquet(str(tmp_path / "allempty.parquet"), ["", "  "])
    with pytest.raises(DataError, match="empty dataset.*2 document"):
        build(str(tmp_path / "allempty.parquet"))
    texts = _invalid_utf8_string_array([b"fine text here", b"\xc3\x28 broken"])
    pq.write_table(pa.table({"text": texts}), str(tmp_path / "mixed.parquet"))
    dl = build(str(tmp_path / "mixed.parquet"))
    src = dl.stream.datasets[0].source
    assert src.n_docs == 1 and src.read_stats.invalid_utf8 == 1


def test_fsspec_input_url(tmp_path):
    """An fsspec URL (here memory://, as hf:// or s3:// would be) is expanded, tokenized and streamed."""
    import fsspec

    from titan_rw.data.loader import TokenDataLoader
    from titan_rw.data.parquet import expand_parquet_paths

    fs = fsspec.filesystem("memory")
    for i in range(2):
        with fs.open(f"/titan_rw_test/fw/part{i}.parquet", "wb") as f:
            pq.write_table(pa.table({"text": [f"remote doc {i} {j}" for j in range(5)], "id": [f"{i}-{j}" for j in range(5)]}), f)
    try:
        assert expand_parquet_paths("memory://titan_rw_test/fw") == [
            f"memory:///titan_rw_test/fw/part{i}.parquet" for i in range(2)]
        shards = run_tokenize("memory://titan_rw_test/fw", str(tmp_path / "o"), DEFAULT_TOKENIZER, progress=False)
        assert [open_shard(s).n_docs for s in shards] == [5, 5]
        dl = TokenDataLoader.Config(dataset_path="memory://titan_rw_test/fw").build(
            dp_world_size=1, dp_rank=0, seq_len=8, local_batch_size=2)
        next(iter(dl))
        assert dl.last_provenance[0][0]["shard"].startswith("memory://")
    finally:
        fs.rm("/titan_rw_test", recursive=True)


def test_slurm_executor_submits_and_array_tasks_run(tmp_path, monkeypatch):
    """--slurm: datatrove's SlurmPipelineExecutor writes an sbatch array script and submits it
    (a stand-in `sbatch` records it); each array task then runs the pickled pipeline as a node would."""
    from needs import need_tool

    # the array task expands SLURM_NODELIST with Slurm's own `scontrol show hostnames` (datatrove)
    need_tool("scontrol", "datatrove's Slurm array tasks run `scontrol show hostnames` "
                          "(install Slurm, e.g. `bash launch/ci_services.sh`)")
    import dill

    bindir = tmp_path / "bin"
    bindir.mkdir()
    sbatch = bindir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch_calls\necho "Submitted batch job 4242"\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        write_docs_parquet(str(src / f"p{i}.parquet"), [f"slurm doc {i}.{j}" for j in range(4)])
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_JOB_PARTITION", "cpu")  # the driver runs inside an allocation
    monkeypatch.setenv("VIRTUAL_ENV", "/opt/venvs/titan")
    slurm = {"partition": None, "time": "01:00:00", "cpus_per_task": 2, "mem_per_cpu_gb": 2,
             "sbatch_args": {"account": "myproj"}}
    assert run_tokenize(str(src), str(out), DEFAULT_TOKENIZER, slurm=slurm, progress=False) == []
    script = (out / ".datatrove" / "launch_script.slurm").read_text()
    assert "--partition=cpu" in script and "--account=myproj" in script and "--array=0-1" in script
    assert "source /opt/venvs/titan/bin/activate" in script  # array tasks run in the driver's venv
    assert (tmp_path / "sbatch_calls").read_text().count("\n") == 2  # the job + datatrove's stats merge
    for i in range(2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
        monkeypatch.setenv("SLURM_NODELIST", "node01")
        with open(out / ".datatrove" / "executor.pik", "rb") as f:
            dill.load(f).run()
    assert [open_shard(str(out / f"shard_{i:05d}.ds")).n_docs for i in range(2)] == [4, 4]

"""The W&B sink on a real run: `python -m titan_rw.train` with TorchTitan's `--metrics.enable_wandb
true` and W&B's own environment (WANDB_MODE=offline, WANDB_PROJECT), no network. The offline run
file (`<dump>/tb/<time>/wandb/offline-run-*/run-*.wandb`) is read back here record by record with
W&B's own protobufs (`wandb.proto.wandb_internal_pb2.Record`; the file is a LevelDB-style log of
32 KiB blocks, `read_wandb_records`), not by mocking wandb.

- every charted number of every metrics.jsonl row is in W&B's history at its step under the
  same tag as in TensorBoard, with the same value (the row's float, exactly);
- on histogram steps the weight histogram's buckets start at 0, end at max(2/b, max weight) of the
  row, and count every valid sample of the step (16: two micro-batch groups of 8);
- on samples steps the table (a table file of the run) holds samples.jsonl's entries;
- without the wandb package, enable_wandb is a one-line config error naming the extra (exit 2).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from titan_rw.observability.jsonl import read_metrics, read_samples
from titan_rw.observability.names import tag_of
from titan_rw.observability.names import HIST_TAGS, NOT_CHARTED
from titan_rw.observability.wandb_sink import SAMPLE_COLUMNS, SAMPLES_KEY

pytest.importorskip("wandb")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TRAIN = ["--config", "train_configs/debug_cpu.toml", "--training.steps", str(STEPS), "--training.seq_len", "64",
         "--reweight.scope", "microbatch", "--reweight.warmup_steps", "0", "--logging.log_interval", "2",
         "--logging.histogram_interval", "2", "--logging.samples_interval", "2", "--lr_scheduler.warmup_steps", "1",
         "--checkpoint.enable", "false", "--metrics.enable_wandb", "true"]


def read_wandb_records(path: str) -> list:
    """The `Record` protobufs of a W&B run file: a 7-byte header (':W&B', 0xBEE1, version), then
    32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last); a block's tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def history(records) -> dict[int, dict]:
    """step -> {key path joined by '.': value} of the run's history records."""
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {".".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
            out.setdefault(int(r.history.step.num), {}).update(items)
    return out


def _env(tmp) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_PROJECT="titan_rw-test",
               WANDB_CONSOLE="off", WANDB_SILENT="true", WANDB_DIR=str(tmp), WANDB_CACHE_DIR=str(tmp / "cache"),
               WANDB_CONFIG_DIR=str(tmp / "config"), WANDB_DATA_DIR=str(tmp / "data"))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    dump = tmp / "run"
    p = subprocess.run([sys.executable, "-m", "titan_rw.train", *TRAIN, "--job.dump_folder", str(dump)], cwd=ROOT,
                       env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    files = glob.glob(str(dump / "tb" / "*" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, (files, os.listdir(dump))
    return {"dir": str(dump), "file": files[0], "history": history(read_wandb_records(files[0]))}


@pytest.mark.slow
def test_wandb_history_has_every_row_under_its_tag(run):
    rows = read_metrics(run["dir"])
    hist = run["history"]
    assert sorted(hist) == [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        got = hist[r["step"]]
        want = {tag_of(k): float(v) for k, v in r.items() if k not in NOT_CHARTED and v is not None
                and isinstance(v, (int, float)) and not isinstance(v, bool)}
        want.update({f"data/{key}/{dom}": d[key] for dom, d in r["domains"].items() for key in d})
        assert {"loss/unweighted", "weights/max", "bound/two_over_b", "perf/grad_norm", "health/skipped"} <= set(want)
        for tag, v in want.items():
            assert got[tag] == v, (r["step"], tag)


@pytest.mark.slow
def test_wandb_weight_histogram_reaches_the_bound(run):
    rows = {r["step"]: r for r in read_metrics(run["dir"])}
    for step in (1, 2, 4):  # histogram_interval 2, and step 1
        h = run["history"][step]
        bins, counts = h[HIST_TAGS["weights"] + ".bins"], h[HIST_TAGS["weights"] + ".values"]
        r = rows[step]
        assert len(bins) == len(counts) + 1 == 41
        assert bins[0] == 0.0
        assert bins[-1] == pytest.approx(max(r["max_weight_bound"], r["max_weight"]), rel=1e-6)
        assert sum(counts) == 16  # 2 groups of 8 valid samples
        assert h[HIST_TAGS["losses"] + "._type"] == "histogram"
    assert HIST_TAGS["weights"] + ".bins" not in run["history"][3]


@pytest.mark.slow
def test_wandb_samples_table_holds_samples_jsonl(run):
    samples = read_samples(run["dir"])
    assert [s["step"] for s in samples] == [1, 2, 4]
    run_dir = os.path.dirname(run["file"])
    for s in samples:
        h = run["history"][s["step"]]
        assert h[SAMPLES_KEY + "._type"] == "table-file"
        with open(os.path.join(run_dir, "files", h[SAMPLES_KEY + ".path"])) as fh:
            table = json.load(fh)
        assert table["columns"] == list(SAMPLE_COLUMNS)
        want = [[s["step"], which, n, x["weight_x_b"], x["weight"], x["loss"], x["domain"], x["doc_id"], x["url"], x["text"]]
                for which in ("top", "bottom") for n, x in enumerate(s[which], 1)]
        assert table["data"] == want


def test_enable_wandb_without_wandb_is_one_line(tmp_path):
    hide = "import sys; sys.modules['wandb'] = None; from titan_rw.train import train_main; sys.exit(train_main())"
    p = subprocess.run([sys.executable, "-c", hide, *TRAIN, "--job.dump_folder", str(tmp_path / "run")], cwd=ROOT,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("titan_rw: config error: metrics.enable_wandb = true needs the wandb package")
    assert "titan_rw[wandb]" in line
    assert not (tmp_path / "run").exists()

"""Nothing lost on resume (issue 13): real training processes, real DCP folders, CPU, tiny model.

One run (6 steps, a checkpoint every step, metrics rows every 3 steps, keep_latest_k 2) is
SIGKILLed after step 4 and then restarted in the ways a user does, each checked for what it must
never lose or overwrite (docs/resuming.md, "What is checked on resume"):

- the SIGKILL after the step-4 save: metrics rows 1-4 are on disk (rows are flushed before a
  checkpoint is complete), although the log interval would have written step 3 only;
- a restart with another training.seq_len and data.seed: exit 2 before any step, one message naming
  the keys, old and new values and the ways out; no checkpoint, metrics row or run config changed;
- a copy whose checkpoints are all damaged: exit 2, never a fresh start over them;
- the way out the message gives (a new folder starting from the checkpoint's weights only) works;
- a restart with another reweight.strategy and temperature: one log line saying what changed, the
  run finishes; every step has exactly one metrics row; keep_latest_k = 2 leaves 2 checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest


from helpers import ROOT, subprocess_env, tmpfs_mount_problem  # noqa: E402
pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [
    "--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny", "--training.steps", str(STEPS),
    "--training.seq_len", "32", "--training.local_batch_size", "8", "--training.global_batch_size", "16",
    "--logging.log_interval", "3", "--reweight.warmup_steps", "2", "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2", "--metrics.enable_tensorboard", "false",
]


def _run(tmp, folder, *extra, expect=0, prefix=(), timeout=300):
    cmd = [*prefix, sys.executable, "-m", "titan_rw.train", *COMMON, "--job.dump_folder", folder, *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == expect, f"exit {out.returncode} (expected {expect})\n" + log[-6000:]
    return log


def _rows(folder) -> list[int]:
    """The step of every row of metrics.jsonl, in file order (a row written twice shows twice)."""
    with open(os.path.join(folder, "metrics.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh if line.strip()]


def _steps(folder) -> list[str]:
    return sorted(os.listdir(os.path.join(folder, "checkpoint")), key=lambda n: int(n.split("-")[1]))


def _snapshot(folder) -> dict:
    """Every checkpoint file's bytes (hashed), metrics.jsonl and the saved run config."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        if rel.split(os.sep)[0] not in ("checkpoint", "."):
            continue
        for f in files:
            if rel == "." and f not in ("metrics.jsonl", "run_config.toml", "config.json"):
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.join(rel, f)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _one_line(log, needle):
    lines = [ln for ln in log.splitlines() if needle in ln]
    assert len(lines) == 1, (needle, log[-4000:])
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("resume_safety"))
    folder = os.path.join(base, "run")
    r = {"base": base, "folder": folder}
    _run(base, folder, "--fault_injection.kill_at_step", "4", expect=-9)
    r["rows_after_kill"] = _rows(folder)
    r["steps_after_kill"] = _steps(folder)
    r["snapshot"] = _snapshot(folder)

    # a changed data-order key: refused before any step, nothing touched
    r["mismatch_log"] = _run(base, folder, "--training.seq_len", "64", "--data.seed", "3", expect=2)
    r["snapshot_after_mismatch"] = _snapshot(folder)

    # every checkpoint damaged: refused, never a fresh start over them
    damaged = os.path.join(base, "damaged")
    shutil.copytree(folder, damaged)
    for step in _steps(damaged):
        d = os.path.join(damaged, "checkpoint", step)
        for f in os.listdir(d):
            if f.endswith(".distcp"):
                with open(os.path.join(d, f), "r+b") as fh:
                    fh.truncate(os.path.getsize(os.path.join(d, f)) // 2)
    r["damaged"] = damaged
    r["damaged_snapshot"] = _snapshot(damaged)
    r["damaged_log"] = _run(base, damaged, expect=2)
    r["damaged_snapshot_after"] = _snapshot(damaged)

    # the way out the mismatch message names: a new folder, the checkpoint's weights only
    r["wayout"] = os.path.join(base, "wayout")
    r["wayout_from"] = os.path.join(folder, "checkpoint", r["steps_after_kill"][-1])
    r["wayout_log"] = _run(base, r["wayout"], "--training.seq_len", "64", "--training.steps", "1",
                           "--checkpoint.initial_load_path", r["wayout_from"],
                           "--checkpoint.initial_load_model_only", "true")

    # accepted changes: one log line, the run finishes
    r["changed_log"] = _run(base, folder, "--reweight.strategy", "quadratic", "--reweight.temperature", "2.0")
    return r


def test_metrics_rows_of_checkpointed_steps_survive_sigkill(runs):
    # log_interval 3 would have written steps 1 and 3 only; the step-4 checkpoint covers 1-4
    assert runs["steps_after_kill"][-1] == "step-4"
    assert runs["rows_after_kill"] == [1, 2, 3, 4]
    # the resume continued at step 5: every step has exactly one row, none lost, none twice
    assert _rows(runs["folder"]) == list(range(1, STEPS + 1))


def test_changed_seq_len_and_seed_stop_before_any_step(runs):
    log = runs["mismatch_log"]
    line = _one_line(log, "does not match the checkpoint")
    ckpt = os.path.join(runs["folder"], "checkpoint", "step-4")
    assert ckpt in line
    assert "training.seq_len was 32, is now 64" in line and "data.seed was 0, is now 3" in line
    assert "restore these values" in line and "--job.dump_folder" in line
    assert f"--checkpoint.initial_load_path {ckpt} --checkpoint.initial_load_model_only true" in line
    assert "Training starts" not in log
    assert runs["snapshot_after_mismatch"] == runs["snapshot"]  # no checkpoint, row or run config changed


def test_no_checkpoint_loads_stops_instead_of_a_fresh_start(runs):
    log = runs["damaged_log"]
    line = _one_line(log, "none of them could be loaded")
    for step in _steps(runs["damaged"]):
        assert os.path.join(runs["damaged"], "checkpoint", step) in line and "truncated" in line
    assert "refusing to start a fresh run" in line
    assert "Training starts" not in log
    assert runs["damaged_snapshot_after"] == runs["damaged_snapshot"]


def test_the_way_out_starts_over_from_the_weights(runs):
    log = runs["wayout_log"]
    assert f"Loading the checkpoint from {runs['wayout_from']}" in log
    assert "Training starts at step 1" in log
    assert _rows(runs["wayout"]) == [1]


def test_changed_strategy_and_temperature_are_logged_once(runs):
    line = _one_line(runs["changed_log"], "titan_rw resume: changed since")
    assert os.path.join(runs["folder"], "checkpoint", "step-4") in line
    assert "reweight.strategy was 'linupper', is now 'quadratic'" in line
    assert "reweight.temperature was 1.0, is now 2.0" in line
    assert "continues with the new values" in line
    assert "training.seq_len" not in line and "data.seed" not in line
    with open(os.path.join(runs["folder"], "metrics.jsonl")) as fh:
        rows = {r["step"]: r for r in map(json.loads, fh)}
    assert [rows[s]["strategy"] for s in range(1, STEPS + 1)] == ["linupper"] * 4 + ["quadratic"] * 2
    assert rows[6]["temperature"] == 2.0


def test_keep_latest_k_holds_at_the_end(runs):
    assert _steps(runs["folder"]) == ["step-5", "step-6"]


# ---------------------------------------------------------------------- clear errors, before compute
def _big_tokenizer(path, pieces):
    """The shipped sentencepiece model with user-defined pieces added up to `pieces`."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    from titan_rw.data import DEFAULT_TOKENIZER

    proto = spm_pb2.ModelProto()
    with open(DEFAULT_TOKENIZER, "rb") as fh:
        proto.ParseFromString(fh.read())
    for i in range(pieces - len(proto.pieces)):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<extra_{i}>", 0.0, spm_pb2.ModelProto.SentencePiece.USER_DEFINED
    with open(path, "wb") as fh:
        fh.write(proto.SerializeToString())
    return str(path)


def test_bad_values_are_one_clear_line_before_anything(tmp_path, capfd):
    """Each bad value: exit 2, one line naming the key, the value (or path) and what is allowed, no
    traceback, no model built, no dump folder created. The entry points run in this process
    (`train_main` is what `python -m titan_rw.train` exits with); one case runs as a real process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from titan_rw.cli import weights_main
    from titan_rw.train import train_main

    empty = tmp_path / "empty_data"
    empty.mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty / "part-0.parquet")
    big = _big_tokenizer(tmp_path / "big.model", 2100)
    missing = str(tmp_path / "missing.model")
    config = ["--config", os.path.join(ROOT, "train_configs", "debug_cpu.toml")]
    cases = {  # name: (arguments, words the line must hold)
        "eval_batch": (["--periodic_eval.batch_size", "0"], ["periodic_eval.batch_size = 0", ">= 1"]),
        "eval_limit": (["--periodic_eval.limit", "-1"], ["periodic_eval.limit = -1", ">= 0"]),
        "keep_k": (["--checkpoint.keep_latest_k", "1"], ["checkpoint.keep_latest_k = 1", "use 0", ">= 2"]),
        "interval": (["--checkpoint.interval", "0"], ["checkpoint.interval = 0", ">= 1"]),
        "big_tokenizer": (["--data.tokenizer", big], ["data.tokenizer", big, "2100 pieces", "model.flavor 'debug' (2048)"]),
        "no_tokenizer": (["--data.tokenizer", missing], ["data.tokenizer", missing, "not found"]),
        "empty_parquet": (["--data.dataset_path", str(empty)],
                          ["data.dataset_path", str(empty / "part-0.parquet"), "empty dataset"]),
        "no_data": (["--data.dataset_path", str(tmp_path / "nowhere")],
                    ["data.dataset_path", str(tmp_path / "nowhere"), "no such file or directory"]),
        "cap": (None, ["--cap 0.5", ">= 1"]),
    }
    capfd.readouterr()
    for name, (args, words) in cases.items():
        if args is None:
            code = weights_main(["1.0", "2.0", "--cap", "0.5"])
        else:
            code = train_main([*config, *args, "--job.dump_folder", str(tmp_path / f"run_{name}")])
        out, err = capfd.readouterr()
        lines = [ln for ln in (out + err).splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, (name, code, out + err)  # one line: no traceback, no model log
        for word in words:
            assert word in lines[0], (name, word, lines[0])
        assert not os.path.exists(tmp_path / f"run_{name}"), name  # the dump folder was not created

    # a real process: a file where the checkpoint folder goes is found at start, not at the first save
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "checkpoint").write_text("not a folder")
    r = subprocess.run([sys.executable, "-m", "titan_rw.train", *config, "--job.dump_folder", str(occupied)],
                       cwd=ROOT, env=subprocess_env(str(tmp_path)), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stdout + r.stderr)
    assert "checkpoint.folder" in lines[0] and str(occupied / "checkpoint") in lines[0] and "is a file" in lines[0]
    assert os.listdir(occupied) == ["checkpoint"]


# ---------------------------------------------------------------------- signals through torchrun
def test_sigterm_to_the_launcher_exits_143_after_a_checkpoint(tmp_path):
    """SIGTERM to the launcher (as Slurm and users send it), here `titan-rw train --nproc 2`, which
    forwards it to its `titan_rw.torchrun`, which forwards it to the ranks: they save a checkpoint
    of the step they stopped at, every metrics row up to it is on disk, and the launcher exits 143."""
    import signal
    import time

    folder = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "titan_rw.train", "--nproc", "2", *COMMON, "--training.steps", "500",
           "--checkpoint.interval", "1000", "--logging.log_interval", "50", "--job.dump_folder", folder]
    p = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(folder, "metrics.jsonl")):  # step 1's row (log_interval 50)
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-4000:]
            time.sleep(0.5)
        time.sleep(2)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, out[-4000:]
    line = _one_line(out, "titan_rw.torchrun: stopped by SIGTERM")
    assert "exit code 143" in line
    stop = int(out.split("titan_rw: stopping at step ")[1].split(":")[0])
    assert 1 <= stop < 500
    assert _steps(folder) == [f"step-{stop}"]
    assert os.path.isfile(os.path.join(folder, "checkpoint", f"step-{stop}", ".metadata"))
    assert _rows(folder) == list(range(1, stop + 1))  # flushed before the checkpoint: none lost


# ---------------------------------------------------------------------- full disk, read-only mount
def test_disk_full_during_a_save_and_a_read_only_folder(tmp_path):
    """The checkpoint folder on a 7 MiB tmpfs (a tiny-model checkpoint is ~4.9 MB), mounted in a user
    namespace (no root needed): the step-2 save fits, the step-4 save runs out of space. The run
    stops with one line saying so, with the path; the partial step-4 is never loaded: after more
    space, the same command resumes from step-2. A read-only folder is refused at start."""
    why = tmpfs_mount_problem()
    if why:
        pytest.skip(f"disk-full test needs a small file system without root: {why}")
    folder = tmp_path / "run"
    (folder / "checkpoint").mkdir(parents=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    args = " ".join([*COMMON, "--training.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0"])
    py = f"{sys.executable} -m titan_rw.train {args}"
    script = f"""
set -u
mount -t tmpfs -o size=7m tmpfs {folder}/checkpoint
{py} --job.dump_folder {folder} > {tmp_path}/full.log 2>&1; echo $? > {tmp_path}/full.rc
ls -a {folder}/checkpoint/step-2 {folder}/checkpoint/step-4 > {tmp_path}/after_full.txt 2>&1
mount -o remount,size=64m {folder}/checkpoint
{py} --job.dump_folder {folder} > {tmp_path}/resume.log 2>&1; echo $? > {tmp_path}/resume.rc
mount -t tmpfs -o ro,size=1m tmpfs {ro}
{py} --job.dump_folder {ro}/run > {tmp_path}/ro.log 2>&1; echo $? > {tmp_path}/ro.rc
"""
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                   env=subprocess_env(str(tmp_path)), timeout=600, check=True)
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    full = read("full.log")
    assert read("full.rc").strip() == "1", full[-4000:]
    line = _one_line(full, "no space left on device")
    assert f"{folder}/checkpoint/step-4" in line and f"newest complete checkpoint is {folder}/checkpoint/step-2" in line
    assert "Traceback" not in full
    listing = read("after_full.txt")
    assert listing.split(f"{folder}/checkpoint/step-4:")[1].split().count(".metadata") == 0  # partial
    assert _rows(folder)[:4] == [1, 2, 3, 4]  # the rows of the failed save's steps were written first
    resume = read("resume.log")
    assert read("resume.rc").strip() == "0", resume[-4000:]
    line = _one_line(resume, "titan_rw checkpoint: skipped")
    assert "step-4: no .metadata" in line and line.rstrip().endswith(f"loaded {folder}/checkpoint/step-2")
    ro_log = read("ro.log")
    assert read("ro.rc").strip() == "2", ro_log[-3000:]
    line = _one_line(ro_log, "job.dump_folder")
    assert f"{ro}/run cannot be written" in line and "read-only" in line

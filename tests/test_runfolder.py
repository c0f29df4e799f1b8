"""One run per folder, every row readable (issue 24): real training processes, CPU, tiny model.

- the run lock (titan_rw.runlock, docs/resuming.md "One run per folder"): two runs started together
  on one folder: exactly one trains, the other exits 2 with one line naming the folder and the
  holder; a 2-rank run started on the held folder exits 2 too (rank 0's one line, no rank hangs);
  the folder's checkpoints, rows and run config are the holder's only;
- a kill -9 leaves its lock (taken over on resume: tests/test_resume.py); a lock from another host
  with a fresh heartbeat blocks (exit 2, nothing changed); with an hour-old heartbeat it is taken
  over; the rules for a torchrun restart / Slurm requeue on another node, on real lock files;
- torn lines: a row cut mid-line (as a kill leaves it) in metrics.jsonl and samples.jsonl is cut
  away on resume (one log line with the bytes), every line then parses, the steps are right, and
  `titan-rw report` works on the torn folder and after the resume;
- a full disk under the metrics writer (a real tmpfs in a user namespace): one line, exit 1, no
  traceback, no new checkpoint and the old one byte-identical; after freeing space the same command
  resumes to the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest


from helpers import ROOT, subprocess_env, tmpfs_mount_problem  # noqa: E402
pytestmark = pytest.mark.slow

COMMON = [
    "--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny",
    "--training.seq_len", "32", "--training.local_batch_size", "8", "--training.global_batch_size", "16",
    "--reweight.warmup_steps", "2", "--lr_scheduler.warmup_steps", "2", "--metrics.enable_tensorboard", "false",
]
BUSY = "is in use by another run"


def _cmd(folder, *extra, nproc=1):
    n = ["--nproc", str(nproc)] if nproc > 1 else []
    return [sys.executable, "-m", "titan_rw.train", *n, *COMMON, "--job.dump_folder", folder, *extra]


def _run(tmp, folder, *extra, expect=0, timeout=300):
    out = subprocess.run(_cmd(folder, *extra), cwd=ROOT, env=subprocess_env(tmp), capture_output=True, text=True,
                         timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == expect, f"exit {out.returncode} (expected {expect})\n" + log[-6000:]
    return log


def _lines(log, needle) -> list[str]:
    return [ln for ln in log.splitlines() if needle in ln]


def _file_steps(folder, name="metrics.jsonl") -> list[int]:
    """The step of every line, in file order, each line parsed strictly (a torn line fails)."""
    with open(os.path.join(folder, name)) as fh:
        return [json.loads(line)["step"] for line in fh]


def _hashes(folder) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        if rel.split(os.sep)[0] not in ("checkpoint", "."):
            continue
        for f in files:
            if rel == "." and f not in ("metrics.jsonl", "samples.jsonl", "run_config.toml", "config.json"):
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.join(rel, f)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _lock(folder) -> dict:
    with open(os.path.join(folder, "run.lock")) as fh:
        return json.load(fh)


STARTED = 1796180000.0  # the other host's run started then: 2026-12-02 02:53:20 UTC


def _write_lock(folder, **fields) -> None:
    rec = {"host": "node-gone-17", "pid": 4242, "started": STARTED, "heartbeat": time.time(),
           "lease_s": 60.0, "slurm_job_id": None, "slurm_restart": 0, "torchrun_run_id": None,
           "torchrun_restart": 0, "token": "feedface"}
    rec.update(fields)
    with open(os.path.join(folder, "run.lock"), "w") as fh:
        json.dump(rec, fh)


# ---------------------------------------------------------------------- two runs, one folder
@pytest.fixture(scope="module")
def contest(tmp_path_factory):
    """Two 1-process runs started together (lr 1e-3 and 2e-3, long enough to still run when the
    other gives up); then a 2-rank run on the held folder; then SIGTERM to the holder."""
    base = str(tmp_path_factory.mktemp("contest"))
    folder = os.path.join(base, "run")
    long = ["--training.steps", "100000", "--checkpoint.interval", "100000", "--logging.log_interval", "50"]
    lrs = ("0.001", "0.002")
    procs = [subprocess.Popen(_cmd(folder, *long, "--optimizer.lr", lr), cwd=ROOT, env=subprocess_env(base),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for lr in lrs]
    r = {"folder": folder}
    try:
        deadline = time.time() + 400
        while all(p.poll() is None for p in procs):
            assert time.time() < deadline, "neither run stopped"
            time.sleep(0.5)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        holder = 1 - loser
        r["loser_rc"] = procs[loser].returncode
        r["loser_log"] = procs[loser].communicate()[0]
        r["holder_lr"] = lrs[holder]
        r["lock"] = _lock(folder)
        r["holder_pid"] = procs[holder].pid
        # a 2-rank run on the held folder: rank 0 refuses, rank 1 learns it through torchrun's store
        two = subprocess.run(_cmd(folder, *long, nproc=2), cwd=ROOT, env=subprocess_env(base), capture_output=True,
                             text=True, timeout=300)
        r["two_rc"], r["two_log"] = two.returncode, two.stdout + two.stderr
        r["holder_alive"] = procs[holder].poll() is None
        procs[holder].send_signal(signal.SIGTERM)
        r["holder_log"] = procs[holder].communicate(timeout=300)[0]
        r["holder_rc"] = procs[holder].returncode
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return r


def test_two_runs_on_one_folder_one_trains_the_other_exits_2(contest):
    r = contest
    assert r["loser_rc"] == 2, r["loser_log"][-4000:]
    line, = _lines(r["loser_log"], BUSY)
    assert f"the run folder {r['folder']} {BUSY}" in line
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["lock"]["started"]))
    assert f"host {socket.gethostname()}, pid {r['holder_pid']}, started {started} UTC" in line
    assert "another --job.dump_folder" in line and "Traceback" not in r["loser_log"]
    assert r["lock"]["pid"] == r["holder_pid"]
    assert len(os.listdir(os.path.join(r["folder"], "structured_logs"))) == 1  # the holder's: the loser built nothing


def test_a_two_rank_run_on_a_held_folder_exits_2_on_every_rank(contest):
    r = contest
    assert r["holder_alive"], r["holder_log"][-3000:]
    assert r["two_rc"] == 2, r["two_log"][-4000:]
    assert len(_lines(r["two_log"], BUSY)) == 1, r["two_log"][-4000:]  # rank 0's line, once
    assert "Traceback" not in r["two_log"]


def test_the_folder_holds_only_the_holders_checkpoints_and_rows(contest):
    r = contest
    assert r["holder_rc"] == 143, r["holder_log"][-4000:]
    stop = int(r["holder_log"].split("titan_rw: stopping at step ")[1].split(":")[0])
    assert os.listdir(os.path.join(r["folder"], "checkpoint")) == [f"step-{stop}"]
    assert _file_steps(r["folder"]) == list(range(1, stop + 1))  # one writer: no interleaved rows
    import tomllib

    with open(os.path.join(r["folder"], "run_config.toml"), "rb") as fh:
        assert tomllib.load(fh)["optimizer"]["lr"] == float(r["holder_lr"])
    assert not os.path.exists(os.path.join(r["folder"], "run.lock"))  # released on the SIGTERM exit


# ---------------------------------------------------------------------- stale locks, torn lines
STALE = ["--training.steps", "6", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
         "--logging.log_interval", "1", "--logging.samples_interval", "1"]


def _tear(path) -> int:
    """Cut the file's last line in the middle, as a kill mid-write leaves it; returns the bytes left
    of that line."""
    with open(path, "rb") as fh:
        data = fh.read()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    keep = start + (len(data) - start) // 2
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return keep - start


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("stale"))
    folder = os.path.join(base, "run")
    r = {"folder": folder}
    _run(base, folder, *STALE, "--fault_injection.kill_at_step", "3", expect=-9)  # checkpoint step-2 on disk
    r["lock1"] = _lock(folder)  # left by the kill (a kill -9'd lock taken over: tests/test_resume.py)
    r["steps_before_tear"] = _file_steps(folder)
    r["torn"] = {name: _tear(os.path.join(folder, name)) for name in ("metrics.jsonl", "samples.jsonl")}
    from titan_rw.report import report_main

    r["report_torn_rc"] = report_main([folder, "--out", os.path.join(base, "report_torn")])
    _write_lock(folder)  # another host, a fresh heartbeat: a live run there
    r["before_busy"] = _hashes(folder)
    r["busy_log"] = _run(base, folder, *STALE, expect=2)
    r["after_busy"] = _hashes(folder)
    _write_lock(folder, heartbeat=time.time() - 3600)  # the same lock, its holder silent for an hour
    r["takeover_log"] = _run(base, folder, *STALE)
    r["report_rc"] = report_main([folder, "--out", os.path.join(base, "report")])
    return r


def test_a_kill_9_leaves_its_lock_which_names_the_dead_process(stale):
    r = stale
    assert r["lock1"]["host"] == socket.gethostname() and r["lock1"]["pid"] > 0
    with pytest.raises(ProcessLookupError):
        os.kill(r["lock1"]["pid"], 0)
    assert r["steps_before_tear"] == [1, 2, 3]


def test_a_live_lock_from_another_host_blocks_and_changes_nothing(stale):
    r = stale
    line, = _lines(r["busy_log"], BUSY)
    assert "host node-gone-17, pid 4242, started 2026-12-02 02:53:20 UTC" in line
    assert r["after_busy"] == r["before_busy"]


def test_an_old_heartbeat_from_another_host_is_taken_over(stale):
    r = stale
    line, = _lines(r["takeover_log"], "took over the stale lock")
    assert "host node-gone-17, pid 4242" in line
    assert re.search(r"its last heartbeat is 3[6-9]\d\d s old \(lease 60 s\)", line), line
    assert not os.path.exists(os.path.join(r["folder"], "run.lock"))  # released at the end


def test_torn_last_lines_are_cut_on_resume_and_every_row_parses(stale):
    r = stale
    line, = _lines(r["takeover_log"], "cut a torn last line")
    t = r["torn"]
    assert f"metrics.jsonl {t['metrics.jsonl']} bytes" in line and f"samples.jsonl {t['samples.jsonl']} bytes" in line
    # rows 1-2 of the killed run (its torn row 3 cut away), then the resume's 3-6 (from step-2)
    assert _file_steps(r["folder"]) == [1, 2, 3, 4, 5, 6]
    assert _file_steps(r["folder"], "samples.jsonl") == [1, 2, 3, 4, 5, 6]
    from titan_rw.observability.jsonl import read_metrics

    assert [row["step"] for row in read_metrics(r["folder"])] == [1, 2, 3, 4, 5, 6]
    assert "no run summary" not in r["takeover_log"] and "finished 6 steps" in r["takeover_log"]


def test_report_works_on_a_torn_folder_and_after_the_resume(stale):
    assert stale["report_torn_rc"] == 0
    assert stale["report_rc"] == 0


# ---------------------------------------------------------------------- lock rules on real files
def _contender(tmp_path, monkeypatch, **env):
    from titan_rw.runlock import RunLock

    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return RunLock(RunLock.Config(), str(tmp_path))


@pytest.mark.parametrize("lock, env, taken", [
    # torchrun --max-restarts with rank 0 now on another node: the earlier attempt's lock is taken
    ({"torchrun_run_id": "job7", "torchrun_restart": 0}, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"}, True),
    ({"torchrun_run_id": "job7", "torchrun_restart": 1}, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"}, False),
    ({"torchrun_run_id": "job7", "torchrun_restart": 0}, {"TORCHELASTIC_RUN_ID": "job8", "TORCHELASTIC_RESTART_COUNT": "1"}, False),
    # a Slurm requeue (same job id, a higher restart count), and two jobs that are not the same
    ({"slurm_job_id": "991", "slurm_restart": 0}, {"SLURM_JOB_ID": "991", "SLURM_RESTART_COUNT": "1"}, True),
    ({"slurm_job_id": "991", "slurm_restart": 1}, {"SLURM_JOB_ID": "991", "SLURM_RESTART_COUNT": "1"}, False),
    ({"slurm_job_id": "991", "slurm_restart": 0}, {"SLURM_JOB_ID": "992", "SLURM_RESTART_COUNT": "1"}, False),
    ({"heartbeat": 0.0}, {}, True),  # silent since 1970
    ({"heartbeat": "garbage"}, {}, True),  # a damaged lock file
])
def test_lock_rules_on_real_files(tmp_path, monkeypatch, lock, env, taken):
    from titan_rw.runlock import RunLockBusy

    _write_lock(str(tmp_path), **lock)
    me = _contender(tmp_path, monkeypatch, **env)
    if taken:
        assert me.acquire() is not None
        assert _lock(str(tmp_path))["token"] == me.token
        me.release()
        assert not os.path.exists(tmp_path / "run.lock")
    else:
        with pytest.raises(RunLockBusy, match="host node-gone-17, pid 4242"):
            me.acquire()
        assert _lock(str(tmp_path))["token"] == "feedface"  # untouched


def test_heartbeat_renews_and_notices_a_takeover(tmp_path, monkeypatch):
    me = _contender(tmp_path, monkeypatch)
    assert me.acquire() is None
    first = _lock(str(tmp_path))["heartbeat"]
    _write_lock(str(tmp_path), heartbeat=first - 100, token=me.token, host=socket.gethostname(), pid=os.getpid())
    assert me.beat() and _lock(str(tmp_path))["heartbeat"] > first - 100
    _write_lock(str(tmp_path))  # another run took the folder over
    assert not me.beat() and "no longer names this run" in me.lost
    me.release()
    assert _lock(str(tmp_path))["token"] == "feedface"  # not ours: left alone


# ---------------------------------------------------------------------- full disk under the metrics
def test_full_disk_in_the_metrics_writer_is_one_line_and_keeps_the_checkpoint(tmp_path):
    """The whole dump folder on a 7 MiB tmpfs: a 2-step run saves step-2 (~4.9 MB); then a filler
    leaves 300 KB free and the same folder is resumed for 40 steps with no checkpoint due before
    step 40: the metrics and samples rows, TensorBoard events and the structured log fill it first."""
    why = tmpfs_mount_problem()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the full-disk test cannot run here: {why}")
        pytest.skip(f"full-disk test needs a small file system without root: {why}")
    folder = tmp_path / "run"
    folder.mkdir()
    base = [*COMMON, "--metrics.enable_tensorboard", "true", "--checkpoint.interval", "100",
            "--logging.samples_interval", "1", "--logging.top_k", "8",
            "--checkpoint.keep_latest_k", "0", "--logging.log_interval", "1", "--job.dump_folder", str(folder)]
    py = f"{sys.executable} -m titan_rw.train {' '.join(base)}"
    script = f"""
set -u
mount -t tmpfs -o size=7m tmpfs {folder}
{py} --training.steps 2 > {tmp_path}/first.log 2>&1; echo $? > {tmp_path}/first.rc
sha256sum {folder}/checkpoint/step-2/* > {tmp_path}/ck_before.txt
dd if=/dev/zero of={folder}/filler bs=64k > /dev/null 2>&1
truncate -s -300K {folder}/filler
{py} --training.steps 40 > {tmp_path}/full.log 2>&1; echo $? > {tmp_path}/full.rc
sha256sum {folder}/checkpoint/step-2/* > {tmp_path}/ck_after.txt
ls {folder}/checkpoint > {tmp_path}/ck_list.txt
cp {folder}/metrics.jsonl {tmp_path}/metrics_full.jsonl
rm {folder}/filler
mount -o remount,size=64m {folder}
{py} --training.steps 40 > {tmp_path}/resume.log 2>&1; echo $? > {tmp_path}/resume.rc
cp {folder}/metrics.jsonl {tmp_path}/metrics_resumed.jsonl
"""
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                   env=subprocess_env(str(tmp_path)), timeout=600, check=True)
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    assert read("first.rc").strip() == "0", read("first.log")[-3000:]
    full = read("full.log")
    assert read("full.rc").strip() == "1", full[-4000:]
    line, = _lines(full, "no space left on device")
    assert line.startswith("titan_rw logging: no space left on device while writing ") and str(folder) in line
    assert "Free space and start the same command again" in line
    assert "Traceback" not in full and "Errno 28" not in full, full[-4000:]
    assert read("ck_list.txt").split() == ["step-2"]  # no checkpoint after the failed write
    assert read("ck_after.txt") == read("ck_before.txt")  # and step-2 byte for byte as it was
    assert read("resume.rc").strip() == "0", read("resume.log")[-4000:]
    with open(tmp_path / "metrics_resumed.jsonl") as fh:
        rows = [json.loads(ln)["step"] for ln in fh]  # every line parses: the torn row was cut
    # rows 1-2, the full run's 3..m (written before the disk filled), the resume's 3..40 (from step-2)
    middle = rows[2:-38]
    assert rows[:2] == [1, 2] and middle == list(range(3, 3 + len(middle))) and rows[-38:] == list(range(3, 41))
    assert "cut a torn last line" in read("resume.log") or open(tmp_path / "metrics_full.jsonl").read().endswith("\n")

"""The cluster launch path on a real (one-node, localhost) Slurm: sbatch -> srun -> torchrun c10d
-> the trainer -> DCP checkpoint -> requeue -> resume. Plus bash -n / shellcheck on every script.

The Slurm tests need the daemons that `launch/slurm_local.sh` starts (CI: launch/ci_services.sh).
Without them they skip, saying so; with TITAN_RW_REQUIRE_SLURM=1 (set by CI) they fail instead,
so CI can never pass by skipping.

The jobs run the real trainer (`-m titan_rw.train`, train_configs/debug_cpu.toml, 2 gloo ranks,
checkpointing on): the requeue and the USR1 tests check its real exit code (128 + signal), the
checkpoint it saved on the signal, and that the requeued job resumes from it. The stand-in
tests/slurm_standin_train.py serves only the test of launch/torchrun_multi.sh alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import ROOT as ROOT_DIR  # noqa: E402

ROOT = Path(ROOT_DIR)
SCRIPTS = sorted(p for d in ("slurm", "launch") for p in (ROOT / d).glob("*.sh"))
from needs import need_tool, skip_or_fail


def _sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _slurm_missing() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    if not shutil.which("sbatch"):
        return "Slurm is not installed (sbatch not found); CI installs and starts it with launch/slurm_local.sh"
    try:
        ping = _sh("scontrol", "ping", timeout=15)
        nodes = _sh("sinfo", "-h", "-o", "%t", timeout=15)
    except (subprocess.TimeoutExpired, OSError) as e:
        return f"Slurm does not answer ({e}); start it with `sudo bash launch/slurm_local.sh`"
    if "UP" not in ping.stdout:
        said = ((ping.stdout + ping.stderr).strip().splitlines() or ["no answer"])[0]
        return f"slurmctld is not running ({said}); start it with `sudo bash launch/slurm_local.sh`"
    states = {s.strip("*~#!%$@^-") for s in nodes.stdout.split()}
    if not states & {"idle", "mix", "alloc", "comp"}:
        return f"no usable Slurm node (states {sorted(states) or 'none'}); start slurmd with `sudo bash launch/slurm_local.sh`"
    return None


def _need_slurm() -> None:
    why = _slurm_missing()
    if why is not None:
        skip_or_fail(why)


# ---- the scripts parse and are shellcheck-clean ------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bash_syntax(script: Path):
    r = _sh("bash", "-n", str(script))
    assert r.returncode == 0, r.stderr


def test_shellcheck_all_scripts():
    need_tool("shellcheck", "apt-get install shellcheck (launch/ci_services.sh does)")
    r = _sh("shellcheck", "-x", "-P", "SCRIPTDIR", *[str(p.relative_to(ROOT)) for p in SCRIPTS], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_slurm_scripts_have_the_cluster_essentials():
    for name in ("llama7b.sh", "llama1p4b.sh", "debug_cpu.sh", "tokenize_fineweb.sh"):
        text = (ROOT / "slurm" / name).read_text()
        for needle in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --output=slurm/logs/%x-%j.out",
                       "#SBATCH --job-name="):
            assert needle in text, (name, needle)
    common = (ROOT / "slurm" / "common.sh").read_text()
    for needle in ("--rdzv-backend=c10d", '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
                   "--ntasks-per-node=1", "SIGUSR1", "scontrol requeue"):
        assert needle in common, needle


# ---- real Slurm ---------------------------------------------------------------------------------

def _job_args(run_dir: Path, steps: int, interval: int) -> tuple[list[str], list[str]]:
    """(extra sbatch environment, trainer overrides) for a short debug_cpu job."""
    env = [f"RUN_DIR={run_dir}"]
    # the debug model, quick: no TensorBoard, log (and so flush metrics.jsonl) every step
    over = ["--logging.log_interval", "1", "--reweight.warmup_steps", "1", "--training.seq_len", "64",
            "--lr_scheduler.warmup_steps", "2", "--metrics.enable_tensorboard", "false",
            "--training.steps", str(steps), "--checkpoint.interval", str(interval)]
    return env, over


def _sbatch(tmp: Path, run_dir: Path, steps: int, interval: int, *, wait: bool) -> tuple[subprocess.CompletedProcess, str]:
    env, over = _job_args(run_dir, steps, interval)
    name = f"titan-rw-test-{uuid.uuid4().hex[:8]}"
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={tmp}/slurm-%j.out",
           "--export=ALL," + ",".join(env), "--time=00:10:00"]
    if wait:
        cmd.append("--wait")
    cmd += ["slurm/debug_cpu.sh", *over]
    r = _sh(*cmd, timeout=600)
    m = re.search(r"^(\d+)", r.stdout.strip(), re.M)
    assert m, f"sbatch printed no job id: {r.stdout!r} {r.stderr!r}"
    return r, m.group(1)


def _job(job_id: str) -> dict[str, str]:
    out = _sh("scontrol", "show", "job", "-o", job_id).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return rows


def _checkpoints(run_dir: Path) -> list[int]:
    """Complete checkpoints: DCP writes .metadata last (so does the stand-in)."""
    out = []
    for p in (run_dir / "checkpoint").glob("step-*"):
        if (p / ".metadata").exists():
            out.append(int(p.name.split("-")[1]))
    return sorted(out)


def _log(tmp: Path, job_id: str) -> str:
    p = tmp / f"slurm-{job_id}.out"
    return p.read_text(errors="replace") if p.exists() else "(no job log)"


def _why(tmp: Path, job_id: str, run_dir: Path, *what: object) -> str:
    """A failure message in full (pytest shortens a non-string message to ~240 characters): what
    was seen, the job log, and the tail of every rank's own log (the job log shows local rank 0)."""
    parts = [" ".join(map(str, what)), f"--- job log slurm-{job_id}.out ---", _log(tmp, job_id)]
    for p in sorted((run_dir / "logs").rglob("*")) if (run_dir / "logs").is_dir() else []:
        if p.is_file() and p.stat().st_size:
            parts += [f"--- {p.relative_to(run_dir)} (tail) ---", p.read_text(errors="replace")[-3000:]]
    return "\n".join(parts)


def _cancel(job_id: str) -> None:
    _sh("scancel", job_id)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sbatch_debug_cpu_completes_with_metrics_and_checkpoint(tmp_path):
    _need_slurm()
    run = tmp_path / "run"
    steps = 4
    r, job = _sbatch(tmp_path, run, steps=steps, interval=2, wait=True)
    try:
        log = _log(tmp_path, job)
        info = _job(job)
        assert r.returncode == 0, f"sbatch --wait exit {r.returncode}: {r.stderr}\n{log}"
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", _why(tmp_path, job, run, info)
        assert _steps(run) == list(range(1, steps + 1)), log
        assert steps in _checkpoints(run), _why(tmp_path, job, run, sorted(p.name for p in (run / "checkpoint").glob("*")))
        assert "rendezvous localhost:" in log and "restart 0" in log, log
    finally:
        _cancel(job)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_scontrol_requeue_resumes_from_checkpoint(tmp_path):
    _need_slurm()
    run = tmp_path / "run"
    steps, interval = 20, 3
    _, job = _sbatch(tmp_path, run, steps=steps, interval=interval, wait=False)
    try:
        # 1. running, with a complete checkpoint and a step logged past it
        deadline = time.time() + 300
        while not (_checkpoints(run) and max(_steps(run), default=0) > _checkpoints(run)[0]):
            state = _job(job).get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), _why(tmp_path, job, run, state)
            assert time.time() < deadline, f"no checkpoint after 300 s\n{_log(tmp_path, job)}"
            time.sleep(0.3)
        assert max(_steps(run)) < steps, "the job finished before it could be requeued: raise steps"

        # 2. requeue: Slurm stops it (SIGTERM, SIGKILL after KillWait) and queues it again
        r = _sh("scontrol", "requeue", job)
        assert r.returncode == 0, r.stderr
        deadline = time.time() + 120
        while _job(job).get("JobState") in ("RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING"):
            assert time.time() < deadline, _log(tmp_path, job)
            time.sleep(0.5)
        info = _job(job)
        assert info.get("JobState") == "PENDING" and info.get("Restarts") == "1", info
        # while it waits (Slurm holds a requeued job ~cred_expire s), nothing runs: snapshot
        before = _steps(run)
        ckpt = max(_checkpoints(run))
        assert ckpt >= interval

        # 3. back on the node, resumed from that checkpoint, to the end
        deadline = time.time() + 360
        while (state := _job(job).get("JobState")) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            assert time.time() < deadline, f"requeued job not finished after 360 s\n{_log(tmp_path, job)}"
            time.sleep(1)
        log = _log(tmp_path, job)
        info = _job(job)
        assert state == "COMPLETED" and info.get("ExitCode") == "0:0", _why(tmp_path, job, run, info)
        assert info.get("Restarts") == "1", info
        after = _steps(run)
        new = after[len(before):] if after[: len(before)] == before else after
        assert new, f"no steps after the requeue\n{log}"
        assert new[0] == ckpt + 1, f"resumed at step {new[0]}, expected {ckpt + 1} (checkpoint step-{ckpt})\n{log}"
        assert new == list(range(ckpt + 1, steps + 1)), new
        assert "restart 1 on 1 node(s)" in log and f"newest checkpoint: step-{ckpt}" in log, log
        assert f"resumed from the checkpoint of step {ckpt}" in log, log
        # the first attempt: the real trainer got Slurm's SIGTERM, saved the step it was in and
        # exited with 128 + SIGTERM = 143 (a trainer dying without saving leaves only interval
        # checkpoints, and the resumed run would redo steps: new[0] above would not be ckpt + 1)
        stop = re.search(r"titan_rw: stopping at step (\d+): SIGTERM received; saved \S+; exit code (\d+)", log)
        assert stop and int(stop.group(2)) == 128 + 15, log
        assert int(stop.group(1)) == ckpt, log
    finally:
        _cancel(job)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_usr1_before_time_limit_checkpoints_and_requeues_itself(tmp_path):
    """`#SBATCH --signal=B:USR1@N` sends USR1 to the batch shell N s before the time limit;
    `scancel --batch --signal=USR1` does the same now. The script forwards it through srun and
    torchrun to the real trainer's ranks, which finish the step, save a checkpoint of it and exit
    with 128 + SIGUSR1 = 138; the script requeues the job, which resumes from that checkpoint (the
    interval is 100: any other checkpoint would be step-0 or none). A trainer that ignored the
    signal would be killed at the time limit with nothing saved; one that exited 0 would look like
    a finished run to Slurm's RequeueExit."""
    _need_slurm()
    run = tmp_path / "run"
    steps = 16
    _, job = _sbatch(tmp_path, run, steps=steps, interval=100, wait=False)
    try:
        deadline = time.time() + 300
        while len(_steps(run)) < 3:
            state = _job(job).get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), _why(tmp_path, job, run, state)
            assert time.time() < deadline, _log(tmp_path, job)
            time.sleep(0.5)
        assert _sh("scancel", "--batch", "--signal=USR1", job).returncode == 0
        deadline = time.time() + 400
        while (state := _job(job).get("JobState")) != "COMPLETED":
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), _why(tmp_path, job, run, state)
            assert time.time() < deadline, _log(tmp_path, job)
            time.sleep(1)
        log = _log(tmp_path, job)
        assert _job(job).get("Restarts") == "1", log
        assert "USR1: asking the trainer to checkpoint" in log and "requeueing job" in log, log
        stop = re.search(r"titan_rw: stopping at step (\d+): SIGUSR1 received; saved (\S+); exit code (\d+)", log)
        assert stop, log
        k = int(stop.group(1))
        assert int(stop.group(3)) == 128 + 10, log  # the trainer's real exit code: 128 + SIGUSR1
        assert stop.group(2) == str(run / "checkpoint" / f"step-{k}"), log
        assert 3 <= k < steps, log
        m = re.search(r"restart 1 .*\n.*newest checkpoint: step-(\d+)", log)
        assert m and int(m.group(1)) == k, log
        assert f"resumed from the checkpoint of step {k}" in log, log
        assert _steps(run) == list(range(1, steps + 1)), _steps(run)  # no step lost, none repeated
    finally:
        _cancel(job)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_torchrun_multi_two_nodes_on_localhost(tmp_path):
    """launch/torchrun_multi.sh: two 'nodes' (two torchrun agents) with the static rendezvous."""
    run = tmp_path / "run"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500), NNODES="2",
               NPROC_PER_NODE="1", TRAIN_SCRIPT="tests/slurm_standin_train.py")
    args = ["bash", "launch/torchrun_multi.sh", "--job.dump_folder", str(run), "--training.steps", "3",
            "--standin.step_seconds", "0"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "world 2 resume from step 0" in outs[1], outs  # global rank 0 is on NODE_RANK=0
    assert _steps(run) == [1, 2, 3] and _checkpoints(run) == [3]


def test_a_signal_delivered_twice_at_once_is_one_stop_request(tmp_path):
    """Slurm signals every process of the step and torchrun forwards the signal too, so a rank gets
    SIGTERM twice within milliseconds: that must stay one request (checkpoint, then exit 143). The
    same signal again later still means "stop now" (the process dies of it). A handler treating
    the duplicate as a second request kills the rank before its checkpoint (first run: -15)."""
    code = (
        "import os, signal, time\n"
        "import torch\n"
        "from titan_rw.faults import SAME_SIGNAL_WINDOW_S, StopGuard\n"
        "t = StopGuard.Config().build(rank=0, world_size=1, device=torch.device('cpu'))\n"
        "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert t._received == signal.SIGTERM\n"
        "print('alive after the duplicate', flush=True)\n"
        "t._received_at -= SAME_SIGNAL_WINDOW_S + 1\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "print('alive after the later one', flush=True)\n"
    )
    r = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert "alive after the duplicate" in r.stdout, r.stderr[-2000:]
    assert r.returncode == -15 and "alive after the later one" not in r.stdout, (r.returncode, r.stderr[-2000:])


# ---- datatrove tokenization as a real Slurm array ---------------------------------------------

def test_tokenize_as_slurm_array_job(tmp_path: Path):
    """`titan-rw tokenize --slurm`: datatrove submits an array job to the real Slurm; its tasks
    write the shards and completion markers; the result loads like a local tokenization."""
    _need_slurm()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from titan_rw.data import DEFAULT_TOKENIZER
    from titan_rw.data.shards import open_shard

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        texts = [f"Slurm array document {i}.{j}: the quick brown fox." for j in range(5)]
        pq.write_table(pa.table({"text": texts, "id": [f"d{i}-{j}" for j in range(5)]}), src / f"p{i}.parquet")
    out = tmp_path / "out"
    venv = os.environ.get("VIRTUAL_ENV") or str(Path(os.sys.executable).parents[1])
    env = dict(os.environ, VIRTUAL_ENV=venv)
    r = subprocess.run(
        [str(Path(venv) / "bin" / "titan-rw"), "tokenize", "--input", str(src), "--output", str(out),
         "--tokenizer", DEFAULT_TOKENIZER, "--slurm", "--partition", "debug", "--time", "00:10:00",
         "--cpus-per-task", "1", "--mem-per-cpu-gb", "1", "--no-progress"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    done = out / ".datatrove" / "completions"
    deadline = time.time() + 240
    while time.time() < deadline and not (done.exists() and len(list(done.glob("*"))) >= 2):
        time.sleep(2)
    logs = "\n".join(p.read_text()[-1500:] for p in (out / ".datatrove").rglob("*.out")) if out.exists() else ""
    assert done.exists() and len(list(done.glob("*"))) == 2, f"array tasks did not complete:\n{logs}"
    shards = [open_shard(str(out / f"shard_{i:05d}.ds")) for i in range(2)]
    assert [s.n_docs for s in shards] == [5, 5]
    # it really ran as a Slurm array: two COMPLETED array tasks whose logs go under this output
    # (a task writes its completion marker before slurmd reports it COMPLETED: wait for that)
    deadline = time.time() + 60
    while True:
        ours = [j for j in _sh("scontrol", "show", "job", "-o").stdout.splitlines() if str(out) in j]
        tasks = {re.search(r"ArrayTaskId=(\d+)", j).group(1) for j in ours
                 if "ArrayTaskId=" in j and "JobState=COMPLETED" in j and "titan_rw_tokenize" in j}
        if tasks >= {"0", "1"} or time.time() > deadline:
            break
        time.sleep(1)
    assert tasks >= {"0", "1"}, ours

"""Extra environments on other torch releases, shared by the smokes that check titan_rw on them
against this environment (tests/test_torch211.py, tests/test_torch215.py).

`launch/setup_torch_env.sh VERSION` makes them (CI: `.ci/run`, for 2.11.0 and 2.15.0). A test finds
one through TITAN_RW_TORCH<MAJOR><MINOR>_PYTHON (default `.venv-torch<MAJOR><MINOR>/bin/python` in
the repo); without it the test skips and says why, with TITAN_RW_REQUIRE_TORCH<MAJOR><MINOR>=1 (CI)
it fails instead.

The training smoke (tiny model, 4 steps, checkpoint every 2): 1 process, and 2 gloo ranks SIGKILLed
after step 3 then resumed from step 2, on the other torch, have the per-step losses, weights and
gradient norms of the same runs on this torch, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, subprocess_env  # noqa: E402
SETUP_HINT = {"2.15": "PIP_CONFIG_FILE=/dev/null bash launch/setup_torch_env.sh 2.15.0"}


def other_python(minor: str) -> str:
    """The python of the torch `minor` (e.g. "2.11") environment, or skip (fail when required)."""
    tag = minor.replace(".", "")
    var, require = f"TITAN_RW_TORCH{tag}_PYTHON", f"TITAN_RW_REQUIRE_TORCH{tag}"
    py = os.environ.get(var) or os.path.join(ROOT, f".venv-torch{tag}", "bin", "python")
    reason = None
    if not os.access(py, os.X_OK):
        hint = SETUP_HINT.get(minor, f"bash launch/setup_torch_env.sh {minor}.0")
        reason = f"no torch {minor} environment at {py}: run `{hint}` (or set {var})"
    else:
        p = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0 or not p.stdout.startswith(minor + "."):
            reason = f"{py} is not a torch {minor} python: {(p.stdout + p.stderr).strip()[-300:]}"
    if reason:
        if os.environ.get(require) == "1":
            pytest.fail(f"{reason} ({require}=1)")
        pytest.skip(reason)
    return py


def env(tmp) -> dict:
    # one OpenMP thread: torch 2.11's CPU run is ~10x slower with 2 on 2 cores
    return subprocess_env(tmp, drop=("TORCHELASTIC_RESTART_COUNT", "TITAN_RW_TRUNC_NORMAL_2_13"))


def py_json(python: str, code: str, tmp) -> dict:
    """Run `code` in `python`; its last stdout line is JSON."""
    p = subprocess.run([python, "-c", textwrap.dedent(code)], cwd=ROOT, env=env(tmp), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"{python} exited {p.returncode}\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ training smoke
STEPS = 4
COMMON = [
    "--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny", "--training.steps", str(STEPS),
    "--training.seq_len", "32", "--training.local_batch_size", "8", "--training.global_batch_size", "16",
    "--logging.log_interval", "1", "--reweight.warmup_steps", "1", "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
    "--metrics.enable_tensorboard", "false", "--job.deterministic", "true",
]
KEYS = ("loss", "weighted_loss", "max_weight", "grad_norm", "lr", "temperature", "ess")


def _train_cmd(python, folder, nproc, *extra):
    launch = [python, "-m", "titan_rw.train"] if nproc == 1 else [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "titan_rw.train"]
    return [*launch, *COMMON, "--job.dump_folder", folder, *extra]


def _wait(procs, expect):
    out = []
    for (name, p, log), want in zip(procs, expect):
        rc = p.wait(timeout=600)
        log.close()
        with open(log.name) as fh:
            text = fh.read()
        ok = rc == want if want != "nonzero" else rc != 0
        assert ok, f"{name}: exit {rc} (expected {want})\n{text[-6000:]}"
        out.append(text)
    return out


def _start(name, cmd, tmp):
    log = open(os.path.join(str(tmp), f"{name}.log"), "w")
    return name, subprocess.Popen(cmd, cwd=ROOT, env=env(tmp), stdout=log, stderr=subprocess.STDOUT), log


def _metrics(folder):
    from titan_rw.observability.jsonl import read_metrics

    return {r["step"]: r for r in read_metrics(folder)}


def this_torch_reference(tmp_path_factory) -> str:
    """The smoke's reference runs on this torch (1 process; 2 ranks), made once for the whole
    session: the first smoke to ask makes them under a file lock, in the temp root its xdist
    workers share; the other smoke waits for the lock and reads them."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = os.path.join(str(root), "torch-env-reference")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(folder, "done")):
            d = lambda name: os.path.join(folder, name)  # noqa: E731
            for name in ("ref1", "ref2"):
                shutil.rmtree(d(name), ignore_errors=True)  # a half-made one (an interrupted smoke)
            _wait([_start("ref1", _train_cmd(sys.executable, d("ref1"), 1), folder),
                   _start("ref2", _train_cmd(sys.executable, d("ref2"), 2), folder)], [0, 0])
            open(os.path.join(folder, "done"), "w").close()
    return folder


def train_equals_this_torch(python: str, tmp_path, tag: str, reference: str) -> str:
    """The training smoke on `python`'s torch against this one (`reference`: this_torch_reference);
    returns the resumed run's log."""
    d = lambda name: os.path.join(str(tmp_path), name)  # noqa: E731
    # on the other torch: 1 process, then 2 ranks SIGKILLed after step 3 (checkpoint step-2 on disk)
    # and resumed
    _wait([_start(f"{tag}_1", _train_cmd(python, d(f"{tag}_1"), 1), tmp_path)], [0])
    _wait([_start(f"{tag}_2_kill", _train_cmd(python, d(f"{tag}_2"), 2, "--fault_injection.kill_at_step", "3"),
                  tmp_path)], ["nonzero"])
    (log,) = _wait([_start(f"{tag}_2_resume", _train_cmd(python, d(f"{tag}_2"), 2), tmp_path)], [0])
    assert "resumed from the checkpoint of step 2" in log
    for ref_name, got_name in (("ref1", f"{tag}_1"), ("ref2", f"{tag}_2")):
        ref, got = _metrics(os.path.join(reference, ref_name)), _metrics(d(got_name))
        assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1)), (ref_name, sorted(got))
        for s in ref:
            for k in KEYS:
                assert got[s][k] == ref[s][k], (got_name, s, k, got[s][k], ref[s][k])  # bit for bit
    assert all(m["loss"] == m["loss"] for m in _metrics(d(f"{tag}_2")).values())  # finite, trained
    return log

"""Checkpoints, exact resume and faults (issue 5): real processes, real DCP folders, CPU, tiny model.

All runs share one short config (6 steps, checkpoint every 2 steps, global batch 16 as 2 micro-
batches on 1 process or 1 per rank on 2, `fault.audit_rows` on: every rank logs the rows it was
served per step). They are built once per module and checked by the tests below:

- 1 process, SIGKILL after step 3, resumed (from step-2): per-step losses bit-identical to an
  uninterrupted run, the same rows served at every step;
- 2 ranks -> 1 and 1 -> 2 (resume on another DP world size): every step serves exactly the rows of the
  uninterrupted run (no row repeated or skipped over the run), losses close;
- torchrun --max-restarts 1 with rank 1 SIGKILLed after step 3: same losses as an uninterrupted
  2-rank run, bit for bit;
- newest checkpoints damaged (a data file truncated in step-6, one deleted in step-4): resume loads
  step-2 and says so in one line; a newest checkpoint whose bytes DCP cannot read: the previous one;
- a NaN per-sample loss gets weight 0; a NaN gradient skips the optimizer step (model and optimizer
  state unchanged); SIGUSR1 checkpoints and exits 138, the resumed run finishes;
- N consecutive skipped steps stop the run (exit 3) after a checkpoint of the last good model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [
    "--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny", "--training.steps", str(STEPS),
    "--training.seq_len", "32", "--training.local_batch_size", "8", "--training.global_batch_size", "16",
    "--logging.log_interval", "1", "--reweight.warmup_steps", "2", "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0", "--fault.audit_rows", "true",
    "--metrics.enable_tensorboard", "false", "--job.deterministic", "true",
]


def _env(tmp):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def _run(tmp, folder, *extra, nproc=1, torchrun_args=(), expect=0, timeout=300):
    if nproc == 1:
        cmd = [sys.executable, "-m", "titan_rw.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *torchrun_args, "-m", "titan_rw.train"]
    cmd += [*COMMON, "--job.dump_folder", folder, *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    with open(folder.rstrip("/") + f".{len(os.listdir(os.path.dirname(folder)))}.log", "w") as fh:
        fh.write(log)
    if expect is not None:
        ok = out.returncode == expect if expect != "nonzero" else out.returncode != 0
        assert ok, f"exit {out.returncode} (expected {expect})\n" + log[-6000:]
    return out.returncode, log


def _metrics(folder):
    from titan_rw.observability.jsonl import read_metrics

    return {r["step"]: r for r in read_metrics(folder)}


def _audit(folder) -> dict[int, list]:
    """step -> sorted global rows served that step (last record per (step, rank) wins)."""
    per: dict[tuple[int, int], list] = {}
    d = os.path.join(folder, "audit")
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name)) as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by SIGKILL
                    continue
                per[(r["step"], r["dp_rank"])] = [tuple(x) for x in r["rows"]]
    out: dict[int, list] = {}
    for (step, _), rows in per.items():
        out.setdefault(step, []).extend(rows)
    return {s: sorted(v) for s, v in out.items()}


def _ckpt(folder, step):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(folder, f"ckpt{step}.pt")
    dcp_to_torch_save(os.path.join(folder, "checkpoint", f"step-{step}"), out)
    return torch.load(out, weights_only=False)


def _tensors(sd, prefix=""):
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("resume"))
    p = lambda name: os.path.join(base, name)  # noqa: E731
    r = {"base": base}
    # 1 process: uninterrupted; SIGKILLed after step 3 (checkpoint step-2 on disk), then resumed
    _run(base, p("ref1"))
    _run(base, p("kill1"), "--fault_injection.kill_at_step", "3", expect=-9)
    shutil.copytree(p("kill1"), p("one_to_two"))
    _, r["resume1_log"] = _run(base, p("kill1"))
    # 2 ranks: uninterrupted; its step-2 checkpoint resumed on 1 process
    _run(base, p("ref2"), nproc=2)
    os.makedirs(p("two_to_one/checkpoint"))
    shutil.copytree(p("ref2/checkpoint/step-2"), p("two_to_one/checkpoint/step-2"))
    _run(base, p("two_to_one"))
    # the 1-process step-2 checkpoint resumed on 2 ranks
    shutil.rmtree(p("one_to_two/audit"))
    _run(base, p("one_to_two"), nproc=2)
    # torchrun elastic restart: rank 1 SIGKILLed after step 3, --max-restarts 1
    _, r["elastic_log"] = _run(base, p("elastic"), "--fault_injection.kill_at_step", "3", "--fault_injection.kill_rank", "1",
                               nproc=2, torchrun_args=["--max-restarts", "1"])
    # damaged newest checkpoints: step-6 truncated, step-4 missing a file -> step-2 loaded
    shutil.copytree(p("ref1"), p("damaged"))
    os.remove(os.path.join(p("damaged"), "metrics.jsonl"))
    for step, how in ((6, "truncate"), (4, "delete")):
        d = p(f"damaged/checkpoint/step-{step}")
        big = max((f for f in os.listdir(d) if f.endswith(".distcp")), key=lambda f: os.path.getsize(os.path.join(d, f)))
        if how == "truncate":
            with open(os.path.join(d, big), "r+b") as fh:
                fh.truncate(os.path.getsize(os.path.join(d, big)) // 2)
        else:
            os.remove(os.path.join(d, big))
    _, r["damaged_log"] = _run(base, p("damaged"))
    # newest checkpoint structurally fine but unreadable (our train-state bytes zeroed): DCP's load
    # fails, the previous one is loaded instead
    shutil.copytree(p("ref1"), p("unreadable"))
    os.remove(os.path.join(p("unreadable"), "metrics.jsonl"))
    from torch.distributed.checkpoint import FileSystemReader

    d = p("unreadable/checkpoint/step-6")
    info = next(v for k, v in FileSystemReader(d).read_metadata().storage_data.items() if k.fqn == "train_state.titan_rw")
    with open(os.path.join(d, info.relative_path), "r+b") as fh:
        fh.seek(info.offset)
        fh.write(b"\0" * info.length)
    _, r["unreadable_log"] = _run(base, p("unreadable"))
    # faults: NaN loss at step 2, NaN gradient at step 3 (fused AdamW: skipped on device),
    # SIGUSR1 during step 4 -> checkpoint step-4, exit 138; then resumed to the end
    faults = ["--fault_injection.nan_loss_steps", "[2]", "--fault_injection.nan_grad_steps", "[3]", "--optimizer.implementation", "fused",
              "--checkpoint.interval", "1"]
    _, r["signal_log"] = _run(base, p("faults"), *faults, "--fault_injection.signal_at_step", "4", expect=128 + 10)
    _run(base, p("faults"), *faults)
    # too many consecutive skips (foreach AdamW: host check): stop with exit 3 after a checkpoint
    _, r["stop_log"] = _run(base, p("stop"), "--fault_injection.nan_grad_steps", "[2, 3]", "--fault.max_consecutive_skips", "2",
                            "--checkpoint.interval", "10", "--checkpoint.enable_first_step_checkpoint", "true", expect=3)
    r.update({k: p(k) for k in ("ref1", "kill1", "ref2", "two_to_one", "one_to_two", "elastic", "damaged", "unreadable", "faults", "stop")})
    return r


KEYS = ("loss", "weighted_loss", "max_weight", "grad_norm", "lr", "temperature")


def test_sigkill_and_resume_is_bit_identical(runs):
    ref, res = _metrics(runs["ref1"]), _metrics(runs["kill1"])
    assert sorted(ref) == sorted(res) == list(range(1, STEPS + 1))
    for s in ref:
        for k in KEYS:
            assert res[s][k] == ref[s][k], (s, k, res[s][k], ref[s][k])  # bit-identical
    assert "resumed from the checkpoint of step 2" in runs["resume1_log"]
    a_ref, a_res = _audit(runs["ref1"]), _audit(runs["kill1"])
    assert a_ref == a_res and sorted(a_ref) == list(range(1, STEPS + 1))
    assert all(len(v) == 16 for v in a_ref.values())


def test_a_kill_9_runs_lock_does_not_block_the_resume(runs):
    """The SIGKILLed run left `run.lock` naming its dead pid (titan_rw.runlock, rule 2): the resume
    took it over in one line and released it at the end (docs/resuming.md "One run per folder")."""
    import socket

    lines = [ln for ln in runs["resume1_log"].splitlines() if "took over the stale lock" in ln]
    assert len(lines) == 1, runs["resume1_log"][-4000:]
    assert "is not running on " + socket.gethostname() in lines[0]
    assert not os.path.exists(os.path.join(runs["base"], "kill1", "run.lock"))


def _check_same_stream(ref_folder, *parts):
    """Per step the same 16 global rows as the reference, and over the run no row twice."""
    ref = _audit(ref_folder)
    got: dict[int, list] = {}
    for folder, steps in parts:
        a = _audit(folder)
        for s in steps:
            got[s] = a[s]
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s] == ref[s], s
    everything = [row for s in got for row in got[s]]
    assert len(everything) == len(set(everything)) == 16 * STEPS


def test_resume_two_ranks_to_one(runs):
    _check_same_stream(runs["ref1"], (runs["ref2"], [1, 2]), (runs["two_to_one"], range(3, STEPS + 1)))
    ref, res = _metrics(runs["ref2"]), _metrics(runs["two_to_one"])
    for s in range(3, STEPS + 1):
        for k in ("loss", "weighted_loss", "max_weight"):
            assert res[s][k] == pytest.approx(ref[s][k], rel=1e-4), (s, k)


def test_resume_one_rank_to_two(runs):
    _check_same_stream(runs["ref1"], (runs["kill1"], [1, 2]), (runs["one_to_two"], range(3, STEPS + 1)))
    ref, res = _metrics(runs["ref1"]), _metrics(runs["one_to_two"])
    for s in range(3, STEPS + 1):
        for k in ("loss", "weighted_loss", "max_weight"):
            assert res[s][k] == pytest.approx(ref[s][k], rel=1e-4), (s, k)


def test_torchrun_restart_after_a_killed_rank(runs):
    assert "SIGKILL of rank 1 after step 3" in runs["elastic_log"]
    ref, res = _metrics(runs["ref2"]), _metrics(runs["elastic"])
    assert sorted(res) == list(range(1, STEPS + 1))
    for s in ref:
        for k in KEYS:
            assert res[s][k] == ref[s][k], (s, k)
    assert _audit(runs["elastic"]) == _audit(runs["ref2"])
    # the restarted rank 0 took the run lock (its first attempt's holder was stopped), released at the end
    assert not os.path.exists(os.path.join(runs["elastic"], "run.lock"))


def test_damaged_checkpoints_are_skipped_and_said_so(runs):
    log = runs["damaged_log"]
    lines = [ln for ln in log.splitlines() if "titan_rw checkpoint: skipped" in ln]
    assert len(lines) == 1, log[-4000:]
    line = lines[0]
    assert "step-6: data file" in line and "truncated" in line
    assert "step-4: data file" in line and "missing" in line
    assert line.rstrip().endswith("loaded " + os.path.join(runs["damaged"], "checkpoint", "step-2"))
    ref, res = _metrics(runs["ref1"]), _metrics(runs["damaged"])
    assert sorted(res) == [3, 4, 5, 6]
    for s in res:
        assert res[s]["loss"] == ref[s]["loss"]


def test_unreadable_checkpoint_falls_back(runs):
    log = runs["unreadable_log"]
    lines = [ln for ln in log.splitlines() if "titan_rw checkpoint: skipped" in ln]
    assert len(lines) == 1, log[-4000:]
    assert "step-6: load failed" in lines[0]
    assert lines[0].rstrip().endswith("loaded " + os.path.join(runs["unreadable"], "checkpoint", "step-4"))
    ref, res = _metrics(runs["ref1"]), _metrics(runs["unreadable"])
    assert sorted(res) == [5, 6]
    for s in res:  # nothing of the failed attempt survived
        for k in KEYS:
            assert res[s][k] == ref[s][k], (s, k)


def test_nan_loss_weight_zero_nan_grad_skipped_signal_checkpoint(runs):
    log = runs["signal_log"]
    assert "stopping at step 4: SIGUSR1 received" in log and "exit code 138" in log
    m = _metrics(runs["faults"])
    assert sorted(m) == list(range(1, STEPS + 1))  # the resumed run finished
    # step 2: +inf in one sample's embedding output (inside the model) -> its loss is NaN, weight 0
    # (b = 15, the statistics of the other samples finite), and the step is dropped
    assert m[2]["nonfinite_samples"] == 1 and m[2]["b"] == 15
    assert all(m[s]["nonfinite_samples"] == 0 and m[s]["b"] == 16 for s in m if s != 2)
    for k in ("loss", "weighted_loss", "max_weight"):
        assert m[2][k] == m[2][k] and abs(m[2][k]) < float("inf")
    assert m[2]["skipped"] == 1 and m[2]["grad_norm"] != m[2]["grad_norm"]  # the NaN reached the weights' gradients
    assert "step 2: 1 sample(s) with a non-finite loss; optimizer step skipped" in log
    # step 3: NaN gradient -> skipped; counted across the resume
    assert m[3]["skipped"] == 1 and m[3]["grad_norm"] != m[3]["grad_norm"]
    assert [m[s]["skipped_steps"] for s in sorted(m)] == [0, 1, 2, 2, 2, 2]
    assert "step 3: non-finite gradient norm" in log
    # both dropped steps left the model and the optimizer state (moments, step count) unchanged;
    # a version that applied step 2's update (NaN rows given weight 0 only) changes them, or NaNs them
    c1, c2, c3, c4 = (_tensors(_ckpt(runs["faults"], s)) for s in (1, 2, 3, 4))
    model_keys = [k for k in c2 if not k.split(".")[0] in ("optimizer", "lr_scheduler", "dataloader", "train_state")]
    opt_keys = [k for k in c2 if k.startswith("optimizer.")]
    assert model_keys and opt_keys
    for k in model_keys + opt_keys:
        assert torch.equal(c1[k], c2[k]) and torch.equal(c2[k], c3[k]), k
    assert all(torch.isfinite(c3[k]).all() for k in model_keys if c3[k].is_floating_point())
    assert any(not torch.equal(c3[k], c4[k]) for k in model_keys)  # step 4 did update


def test_consecutive_skips_stop_after_a_checkpoint(runs):
    log = runs["stop_log"]
    assert "stopping at step 3: 2 consecutive optimizer steps skipped" in log
    folder = runs["stop"]
    assert sorted(os.listdir(os.path.join(folder, "checkpoint"))) == ["step-1", "step-3"]
    c1, c3 = _tensors(_ckpt(folder, 1)), _tensors(_ckpt(folder, 3))
    model_keys = [k for k in c1 if not k.split(".")[0] in ("optimizer", "lr_scheduler", "dataloader", "train_state")]
    assert model_keys and all(torch.equal(c1[k], c3[k]) for k in model_keys)  # the last good model
    m = _metrics(folder)
    assert [m[s]["consecutive_skips"] for s in (1, 2, 3)] == [0, 1, 2]

"""The shipped configs as shipped (issue 21 §5): `train_configs/llama_1p4b.toml` and `llama_7b.toml`
train on 2 gloo ranks with everything as written (async checkpoints, fused AdamW, compile of model
and loss with selective AC, bf16 parameters with fp32 reduction, micro-batch scope) except what a
CPU needs: the tiny flavor, seq_len 32, 6 steps, local batch 2 with a global batch of 2 micro-batches
per rank (accumulation), a checkpoint every 2 steps, a row per step, the dump folder.

Each config: killed by SIGKILL right after step 4, whose async save (`async_mode = "async"`: a
background writer thread) is then in flight, then started again. Checked: the newest *complete*
checkpoint is loaded (step 4 when its writer finished before the kill, else step 2: the folder
without `.metadata` is never loaded); every step, the checkpointed ones included, has its row; the
resumed run's rows are bit for bit those of the killed run's steps it redid, or, when nothing was
redone, those of an uninterrupted run (docs/design.md §6). Also `async_with_pinned_mem` without CUDA
is refused by the config loader in one line (docs/resuming.md).

All runs share one TORCHINDUCTOR_CACHE_DIR (in the module's tmp dir): only the first compile is cold.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT, subprocess_env  # noqa: E402
pytestmark = pytest.mark.slow

STEPS, KILL, INTERVAL = 6, 4, 2
# what a CPU needs, and what the test reads; nothing else of the shipped file is changed
CPU = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.steps", str(STEPS),
       "--checkpoint.interval", str(INTERVAL), "--logging.log_interval", "1"]
CONFIGS = ("llama_1p4b", "llama_7b")
LOCAL = 2  # 1.4B's own local batch; 7B's (1) raised to it so that its compile reuses the 1.4B graphs
KEYS = ("loss", "weighted_loss", "max_weight", "grad_norm", "lr", "temperature", "ess")


def _env(base):
    return subprocess_env(base)  # the inductor cache is shared by every run of the module


def _cmd(name, folder, *extra):
    local = LOCAL
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "titan_rw.train", "--config", f"train_configs/{name}.toml", *CPU,
            "--training.local_batch_size", str(local), "--training.global_batch_size", str(local * 2 * 2),
            "--job.dump_folder", folder, *extra]


def _run(base, label, cmd, expect):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(base), capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    with open(os.path.join(base, f"{label}.log"), "w") as fh:
        fh.write(log)
    ok = p.returncode == expect if expect != "nonzero" else p.returncode != 0
    assert ok, f"{label}: exit {p.returncode} (expected {expect})\n{log[-6000:]}"
    return log


def _rows(folder):
    from titan_rw.observability.jsonl import read_metrics

    return {r["step"]: r for r in read_metrics(folder)}


@pytest.fixture(scope="module", params=CONFIGS)
def shipped(request, tmp_path_factory):
    name = request.param
    base = str(tmp_path_factory.getbasetemp() / "shipped")  # one inductor cache for both configs
    os.makedirs(base, exist_ok=True)
    run = os.path.join(base, name)
    _run(base, f"{name}_kill", _cmd(name, run, "--fault_injection.kill_at_step", str(KILL)), "nonzero")
    ckpt = os.path.join(run, "checkpoint")
    after_kill = {d: os.path.exists(os.path.join(ckpt, d, ".metadata")) for d in sorted(os.listdir(ckpt))}
    before = _rows(run)
    log = _run(base, f"{name}_resume", _cmd(name, run), 0)
    r = dict(name=name, base=base, run=run, after_kill=after_kill, before=before, after=_rows(run), log=log,
             kill_log=open(os.path.join(base, f"{name}_kill.log")).read())
    if after_kill.get(f"step-{KILL}"):  # nothing redone: compare with an uninterrupted run
        ref = os.path.join(base, f"{name}_ref")
        _run(base, f"{name}_ref", _cmd(name, ref), 0)
        r["ref"] = _rows(ref)
    return r


def test_the_shipped_settings_are_the_ones_that_ran(shipped):
    """The runs used the shipped file's settings (read from config.json, the resolved run config)."""
    import json
    import tomllib

    with open(os.path.join(ROOT, "train_configs", f"{shipped['name']}.toml"), "rb") as fh:
        toml = tomllib.load(fh)
    with open(os.path.join(shipped["run"], "config.json")) as fh:
        used = json.load(fh)
    flat = {}
    for section, values in used.items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
    for key in ("checkpoint.async_mode", "optimizer.implementation", "compile.enable", "compile.components",
                "activation_checkpoint.mode", "training.mixed_precision_param", "training.mixed_precision_reduce",
                "reweight.scope", "reweight.strategy", "reweight.temperature", "training.dtype"):
        section, k = key.split(".")
        if key in flat:
            assert flat[key] == toml[section][k], (key, flat[key], toml[section][k])
    assert toml["checkpoint"]["async_mode"] == "async" and toml["optimizer"]["implementation"] == "fused"
    assert toml["compile"]["enable"] and toml["activation_checkpoint"]["mode"] == "selective"
    assert toml["reweight"]["scope"] == "microbatch"
    assert "Staging the checkpoint" in shipped["kill_log"]  # TorchTitan's async path, not a blocking save
    assert "TESTING fault_injection.kill_at_step" in shipped["kill_log"]


def test_the_newest_complete_checkpoint_loads(shipped):
    done = shipped["after_kill"]
    assert done.get(f"step-{KILL - INTERVAL}"), done  # waited for before step 4's save began
    newest = KILL if done.get(f"step-{KILL}") else KILL - INTERVAL
    assert f"resumed from the checkpoint of step {newest} " in shipped["log"], shipped["log"][-3000:]
    final = os.path.join(shipped["run"], "checkpoint", f"step-{STEPS}", ".metadata")
    assert os.path.exists(final)


def test_every_step_keeps_its_row(shipped):
    assert sorted(shipped["before"])[:KILL] == list(range(1, KILL + 1))  # on disk before the kill
    assert sorted(shipped["after"]) == list(range(1, STEPS + 1))
    for s, row in shipped["after"].items():
        assert row["loss"] == row["loss"] and row["max_weight"] > 0, (s, row)  # finite, trained


def test_the_resumed_losses_are_bit_exact(shipped):
    before, after = shipped["before"], shipped["after"]
    if "ref" in shipped:  # resumed from step 4: the whole run equals an uninterrupted one
        pairs = [(s, shipped["ref"][s], after[s]) for s in range(1, STEPS + 1)]
    else:  # resumed from step 2: the redone steps 3, 4 equal their rows from before the kill
        pairs = [(s, before[s], after[s]) for s in range(KILL - INTERVAL + 1, KILL + 1)]
    assert pairs
    for s, want, got in pairs:
        for k in KEYS:
            assert got[k] == want[k], (shipped["name"], s, k, got[k], want[k])


def test_async_with_pinned_mem_without_cuda_is_one_config_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: async_with_pinned_mem is allowed here")
    p = subprocess.run(
        [sys.executable, "-m", "titan_rw.train", "--config", "train_configs/llama_1p4b.toml", *CPU,
         "--checkpoint.async_mode", "async_with_pinned_mem", "--job.dump_folder", str(tmp_path / "run")],
        cwd=ROOT, env=_env(str(tmp_path)), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    # the shipped reweight.warmup_steps (2000) covers the 6 CPU steps: that one warning line may come first
    lines = [ln for ln in lines if "reweight.warmup_steps = 2000 covers" not in ln]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stdout + p.stderr[-3000:])
    assert "checkpoint.async_mode" in lines[0] and "async_with_pinned_mem" in lines[0] and "CUDA" in lines[0]
    assert "llama_1p4b.toml" in lines[0] and '"async"' in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was created

"""Activation checkpointing (as in the 1.4B/7B configs) wraps blocks and renames parameters:
the portable init must still find them, and AC must not change the numbers."""

import json
import subprocess
import sys


def _run(tmp_path, mode):
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "titan_rw.train", "--config", "train_configs/debug_cpu.toml",
           "--model.flavor", "tiny", "--training.steps", "2", "--training.seq_len", "64",
           "--training.local_batch_size", "2", "--training.global_batch_size", "2",
           "--activation_checkpoint.mode", mode, "--checkpoint.enable", "false", "--job.dump_folder", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_activation_checkpointing_keeps_portable_init_and_losses(tmp_path):
    plain, selective = _run(tmp_path, "none"), _run(tmp_path, "selective")
    assert [r["loss"] for r in selective] == [r["loss"] for r in plain]  # same init, same math
    assert abs(selective[1]["grad_norm"] - plain[1]["grad_norm"]) < 1e-5

"""[periodic_eval]: lm-eval on the model being trained, on 2 real gloo ranks (FSDP gathers collectively)."""

import json
import math
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_periodic_eval_logs_scores_on_eval_steps_only(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "titan_rw.train", "--config", "train_configs/debug_cpu.toml",
           "--training.steps", "4", "--training.seq_len", "64", "--checkpoint.enable", "false",
           "--job.dump_folder", str(run), "--periodic_eval.interval", "2", "--periodic_eval.limit", "4"]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    key = "eval/titan_rw_local_ppl/bits_per_byte"
    assert sorted(rows) == [1, 2, 3, 4]
    assert [s for s, row in rows.items() if key in row] == [2, 4]
    assert all(math.isfinite(rows[s][key]) and 0 < rows[s][key] < 20 for s in (2, 4))

"""`[reweight] warmup_mode = "uniform"` on the real trainer (issue 23; docs/design.md §2, §9), and the
warning for a reweighting warm-up longer than the run (issue 21 item 5). CPU, gloo, tiny Llama.

- tests/warmup_worker.py (2 ranks, rows): the burn-in step's gradient is the plain token-mean
  cross-entropy gradient of a float64 reference, with weights exactly 1/b; the next step's is
  sum_i w_i grad f_i with LinUpper's w from float64 formulas; the two rules differ by far more
  than the error. Its configured run (1 step) is shorter than its burn-in: the two ranks say so in
  one warning line, not one per rank; `--check` says it once too.
- `python -m titan_rw.train` at document granularity (1 process, the shipped fortunes, 6 steps,
  burn-in 3, checkpoints every 2): the rows say phase burn-in / temperature null / weights exactly
  the token shares (max w_d / pi_d = 1, the weighted loss = the token-mean loss, bitwise), then
  phase target / r / max w_d / pi_d > 1; a run SIGKILLed after step 3 resumes from step-2 (inside
  the burn-in) and logs steps 3-6, across the end of the burn-in, bit for bit like the
  uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_resume import _run

from helpers import ROOT, metrics_by_step, subprocess_env  # noqa: E402
pytestmark = pytest.mark.slow

WARNING = "covers all training.steps"
FORTUNES = os.path.join(ROOT, "titan_rw", "assets", "corpus", "train", "fortunes.parquet")
BURN_IN = ["--reweight.warmup_mode", "uniform", "--reweight.warmup_steps", "3", "--reweight.temperature", "0.5",
           "--reweight.granularity", "document", "--data.dataset_path", FORTUNES,
           "--reweight.max_documents_per_row", "4", "--reweight.min_document_tokens", "4"]
# compared bit for bit between the uninterrupted and the resumed run
KEYS = ("loss", "weighted_loss", "max_weight", "max_weight_ratio", "b", "grad_norm", "lr", "temperature", "phase",
        "ess")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("burn_in"))
    p = lambda name: os.path.join(base, name)  # noqa: E731
    _, ref_log = _run(base, p("ref"), *BURN_IN)
    _run(base, p("kill"), *BURN_IN, "--fault_injection.kill_at_step", "3", expect=-9)
    assert sorted(os.listdir(os.path.join(p("kill"), "checkpoint"))) == ["step-2"]
    _, resume_log = _run(base, p("kill"), *BURN_IN)
    return {"base": base, "ref": metrics_by_step(p("ref")), "resumed": metrics_by_step(p("kill")), "ref_log": ref_log,
            "resume_log": resume_log}


def test_burn_in_gradient_is_the_token_mean_gradient_then_the_strategy(tmp_path):
    out = tmp_path / "res.json"
    env = subprocess_env(str(tmp_path))
    env["RW_DUMP"] = str(tmp_path / "dump")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "warmup_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    res = json.loads(out.read_text())
    one, two = res["step1"], res["step2"]
    assert one["strategy"] == "uniform" and two["strategy"] == "linupper"
    assert one["weights_exact_uniform"] and not two["weights_exact_uniform"]
    assert two["weights_err"] < 1e-5
    for r in (one, two):
        assert r["grad_err"] <= 1e-5 * r["grad_scale"], res
        assert r["other_err"] > 100 * max(r["grad_err"], 1e-9), res  # the check can fail: the rules differ
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if WARNING in line]
    assert len(lines) == 1, (proc.stdout + proc.stderr)[-4000:]  # one line for the run, not one per rank
    assert "reweight.warmup_steps = 1" in lines[0] and "training.steps = 1" in lines[0]


def test_warm_up_longer_than_the_run_is_one_line_at_the_config_check(tmp_path):
    check = subprocess.run([sys.executable, "-m", "titan_rw.train", "--config", "train_configs/debug_cpu.toml",
                            "--reweight.warmup_steps", "2000", "--training.steps", "50", "--check"],
                           cwd=ROOT, env=subprocess_env(str(tmp_path)), capture_output=True, text=True, timeout=400)
    assert check.returncode == 0, check.stderr[-3000:]
    lines = [line for line in (check.stdout + check.stderr).splitlines() if WARNING in line]
    assert len(lines) == 1 and "r = reweight.warmup_temperature = 100" in lines[0], check.stdout + check.stderr
    assert "reweight.warmup_steps = 2000" in lines[0] and "train_configs/debug_cpu.toml" in lines[0]
    assert "Traceback" not in check.stderr


def test_burn_in_rows_say_what_applies(runs):
    ref = runs["ref"]
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3):
        r = ref[step]
        assert r["granularity"] == "document" and r["phase"] == "burn-in" and r["temperature"] is None, r
        assert r["b"] > 16, r  # several fragments per row: the burn-in is per fragment, not per row
        assert r["max_weight_ratio"] == 1.0, r  # w_d = pi_d exactly
        assert r["weighted_loss"] == r["loss"], r  # sum_d pi_d f_d: the token-mean loss, bitwise
    for step in (4, 5, 6):
        r = ref[step]
        assert r["phase"] == "target" and r["temperature"] == 0.5, r
        assert r["max_weight_ratio"] > 1.01 and r["weighted_loss"] != r["loss"], r  # LinUpper moves the weights
    assert "uniform burn-in for 3 steps" in runs["ref_log"]
    assert WARNING not in runs["ref_log"]


def test_resume_inside_the_burn_in_is_bit_exact_across_its_end(runs):
    ref, res = runs["ref"], runs["resumed"]
    assert sorted(res) == [1, 2, 3, 4, 5, 6]
    assert "resumed from the checkpoint of step 2" in runs["resume_log"]
    for step in range(1, 7):
        for k in KEYS:
            assert res[step][k] == ref[step][k], (step, k, res[step][k], ref[step][k])



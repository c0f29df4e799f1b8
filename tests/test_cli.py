"""The `titan-rw` console script, run as a user runs it."""

import os
import subprocess
import sys

BIN = os.path.join(os.path.dirname(sys.executable), "titan-rw")


def _run(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("train", "tokenize", "tokenizer train", "report", "eval", "weights", "experiment toy-regression", "experiment duplicates"):
        assert cmd in r.stdout


def test_weights_prints_the_capped_weights():
    losses = ["1"] * 7 + ["9"]
    r = _run("weights", *losses, "--strategy", "linupper", "-r", "0.2", "--cap", "2")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if "weight" in line and "loss" in line]
    assert len(rows) == 8
    assert float(rows[-1].split("x b =")[1]) <= 2.0 + 1e-5  # the cap holds
    assert "bound 2/b=0.250000" in r.stdout


def test_unknown_command_and_strategy_fail_clearly():
    r = _run("fly")
    assert r.returncode == 2 and "unknown command 'fly'" in r.stderr
    r = _run("weights", "1", "2", "--strategy", "nope")
    assert r.returncode != 0 and "linupper" in r.stderr

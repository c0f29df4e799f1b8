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


def test_weights_upper_is_the_linear_ramp():
    # losses 0, 1, 2: h = -1, 0, 1 and upper's s = h/2 + 1/2 = 0, 1/2, 1; w = e^s / sum at r = 1
    import math

    r = _run("weights", "0", "1", "2", "--strategy", "upper", "-r", "1")
    assert r.returncode == 0, r.stderr
    assert "strategy=upper" in r.stdout
    got = [float(line.split("weight")[1].split()[0]) for line in r.stdout.splitlines() if "x b =" in line]
    e = [1.0, math.exp(0.5), math.e]
    assert len(got) == 3 and all(abs(g - x / sum(e)) <= 1e-6 for g, x in zip(got, e))

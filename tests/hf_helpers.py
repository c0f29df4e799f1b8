"""Shared by tests/test_export.py and tests/test_lm_eval_cli.py: ONE short debug run (the real
trainer, `python -m titan_rw.train`, DCP checkpoint) and ONE `titan-rw export` of it, per session.
tests/conftest.py imports the fixtures, so every test module shares the same two."""

import subprocess
import sys

import pytest

from helpers import ROOT, subprocess_env  # noqa: E402
STEPS = 10
SEQ = 64
TRAIN = [
    "--config", "train_configs/debug_cpu.toml", "--training.steps", str(STEPS), "--training.seq_len", str(SEQ),
    "--training.local_batch_size", "8", "--training.global_batch_size", "8", "--reweight.warmup_steps", "3",
    "--lr_scheduler.warmup_steps", "3", "--logging.log_interval", "5", "--metrics.enable_tensorboard", "false",
    "--checkpoint.enable", "true", "--checkpoint.interval", str(STEPS),
]


def env(tmp) -> dict:
    """A subprocess environment: this checkout first, offline Hugging Face, private caches."""
    return subprocess_env(tmp, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                          HF_HOME=str(tmp / "hf_home"), TOKENIZERS_PARALLELISM="false")


def run(cmd, tmp, timeout=600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env(tmp), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n" + (p.stdout + p.stderr)[-6000:]
    return p


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_run")
    out = tmp / "run"
    p = run([sys.executable, "-m", "titan_rw.train", *TRAIN, "--job.dump_folder", str(out)], tmp)
    assert (out / "checkpoint" / f"step-{STEPS}" / ".metadata").is_file()
    (tmp / "console.txt").write_text(p.stdout + p.stderr)  # what a user sees (tests/test_console.py)
    return out


@pytest.fixture(scope="session")
def hf_folder(trained_run, tmp_path_factory):
    """`titan-rw export RUN --hf OUT`, as a user runs it."""
    tmp = tmp_path_factory.mktemp("hf_export")
    out = tmp / "hf"
    p = run([sys.executable, "-m", "titan_rw.cli", "export", str(trained_run), "--hf", str(out)], tmp)
    assert str(out) in p.stdout
    return out

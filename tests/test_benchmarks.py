"""The benchmark scripts run in quick mode (they execute and print their tables; numbers not asserted)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], tmp_path, timeout: int) -> str:
    env = dict(os.environ, MASTER_PORT=str(_free_port()), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    p = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p.stdout


def test_bench_step_quick(tmp_path):
    out = _run(["benchmarks/bench_step.py", "--quick", "--dump", str(tmp_path / "dump")], tmp_path, timeout=240)
    assert "Peak memory of loss + backward" in out
    for row in ("per-sample (titan_rw)", "TorchTitan chunked mean", "naive full logits",
                "titan_rw linupper", "titan_rw uniform", "stock TorchTitan trainer",
                "scope microbatch", "scope global_batch"):
        assert row in out, out


def test_bench_loader_quick(tmp_path):
    out = _run(["benchmarks/bench_loader.py", "--quick"], tmp_path, timeout=120)
    for row in ("shards (memmap), seq 2048", "parquet streaming: build", "parquet streaming: serving"):
        assert row in out, out


def test_gpu_check_is_shellcheck_clean():
    from needs import need_tool

    need_tool("shellcheck", "apt-get install shellcheck (launch/ci_services.sh does)")
    p = subprocess.run(["shellcheck", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_gpu_check_plumbing_on_cpu(tmp_path):
    """The script's overrides, the gpu_step.py driver and the table, on 2 CPU processes (tiny model,
    no compile, fp32): not a GPU check, only that the script still matches the trainer's config keys."""
    env = dict(os.environ, NPROC="2", STEPS="3", WARMUP="1", SEQ="32", LOCAL_BATCH="2", RUN_TIMEOUT="150",
               CONFIG="train_configs/debug_cpu.toml", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    p = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out"), "--model.flavor", "tiny", "--compile.enable", "false",
         "--training.mixed_precision_param", "float32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=330,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| uniform  |" in p.stdout and "| linupper |" in p.stdout and "overhead LinUpper / uniform" in p.stdout
    assert "FAILED" not in p.stdout

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
    import shutil

    import pytest

    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed")
    p = subprocess.run(["shellcheck", "benchmarks/gpu_check.sh", "benchmarks/gpu_wheelhouse.sh"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_gpu_check_plumbing_on_cpu(tmp_path):
    """The script's overrides, the gpu_step.py driver, the smoke's checks and the table, on 2 CPU
    processes (tiny model, no compile, fp32): not a GPU check, only that the script still matches the
    trainer's config keys and that the smoke's checks run (the document-mask check is required on
    CUDA only: on CPU it is reported)."""
    env = dict(os.environ, NPROC="2", STEPS="3", WARMUP="1", SEQ="32", LOCAL_BATCH="2", RUN_TIMEOUT="150",
               CONFIG="train_configs/debug_cpu.toml", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               ALLOW_CPU="1", SMOKE_SEQ="64", SMOKE_STEPS="3", SMOKE_TIMEOUT="150",
               WHEELHOUSE=str(tmp_path / "no_wheelhouse"), SITE=str(tmp_path / "site"))
    p = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out"), "--model.flavor", "tiny", "--compile.enable", "false",
         "--training.mixed_precision_param", "float32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=480,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for check in ("finite_losses", "weights_sum_to_1", "no_graph_capture"):
        assert f"smoke: {check:17s} ok" in p.stdout, p.stdout[-3000:]
    assert "smoke: document_mask" in p.stdout and "smoke: ok" in p.stdout
    assert '"body_calls_per_step": [2, 2, 2], "micro_batches": 2' in p.stdout  # 8 rows per rank per step, 4 per micro-batch
    assert "| uniform  |" in p.stdout and "| linupper |" in p.stdout and "overhead LinUpper / uniform" in p.stdout
    assert "FAILED" not in p.stdout
    assert not (tmp_path / "site").exists()  # everything importable: nothing installed


def _gpu_check_fails(tmp_path, **env_extra) -> str:
    env = dict(os.environ, NPROC="1", PYTHON=sys.executable)
    env.update(env_extra)
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr  # one clear line
    assert not (tmp_path / "out").exists()  # refused before any run
    return lines[0]


def test_gpu_check_refuses_an_unusable_torch(tmp_path):
    """No torch at all (an isolated interpreter), and a torch without CUDA: one line each, exit 1."""
    bare = tmp_path / "python-without-torch"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    bare.chmod(0o755)
    line = _gpu_check_fails(tmp_path, PYTHON=str(bare))
    assert line.startswith("gpu_check: unusable torch:") and "cannot import torch" in line, line
    if not torch_has_cuda():
        line = _gpu_check_fails(tmp_path, ALLOW_CPU="0")
        assert line.startswith("gpu_check: unusable torch:") and "sees no CUDA device" in line, line


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

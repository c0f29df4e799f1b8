"""The benchmark scripts run in quick mode: they execute and print their tables. Speeds are not
judged (timings belong in benchmarks/, not in pass/fail tests); what is checked is that every row
has a number and the derived columns come from the right rows."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys

import pytest

from helpers import ROOT  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ratio_ok(ratio: float, a: float, b: float, half: float = 0.05, digits: float = 0.0005) -> bool:
    """`ratio` printed from a / b, where a and b were printed rounded to +-half, the ratio to +-digits."""
    return (a - half) / (b + half) - digits <= ratio <= (a + half) / (b - half) + digits


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
    # every row carries a finite positive number, and the derived columns are computed from the
    # right rows (a table that printed its labels with NaN, or divided by the wrong row, fails).
    # Times are not judged (they belong to the benchmark's reader); peak memory is an allocation
    # count, deterministic on CPU: the per-sample loss holds no [B, T, V] logits, so it stays under
    # the naive full-logits loss (a version materializing the logits would not).
    mib = {m[0]: (float(m[1]), float(m[2])) for m in
           re.findall(r"^  (per-sample \(titan_rw\)|TorchTitan chunked mean|naive full logits)\s+([\d.]+) MiB\s+([\d.]+)×",
                      out, re.M)}
    assert set(mib) == {"per-sample (titan_rw)", "TorchTitan chunked mean", "naive full logits"}, out
    base = mib["TorchTitan chunked mean"][0]
    for name, (v, ratio) in mib.items():
        assert v > 0 and _ratio_ok(ratio, v, base, digits=0.005), (name, v, ratio, base)
    assert mib["per-sample (titan_rw)"][0] < mib["naive full logits"][0], mib
    # each step kind twice, wall and main-thread CPU time (the same interleaved steps), with its ratio
    # to the right reference row
    for clock in ("wall", "cpu"):
        ms = {m[0].strip(): float(m[1]) for m in re.findall(
            rf"^  {clock} (titan_rw linupper|titan_rw uniform|stock TorchTitan trainer|linupper document|"
            rf"linupper float8 emulated|scope microbatch|scope global_batch)\s+([\d.]+) ms", out, re.M)}
        assert len(ms) == 7 and all(math.isfinite(v) and v > 0 for v in ms.values()), (clock, out)
        for row, ref, said in (("titan_rw linupper", "titan_rw uniform", "uniform"),
                               ("titan_rw uniform", "stock TorchTitan trainer", "TorchTitan"),
                               ("linupper document", "titan_rw linupper", "row granularity"),
                               ("linupper float8 emulated", "titan_rw linupper", "no float8"),
                               ("scope global_batch", "scope microbatch", "microbatch")):
            m = re.search(rf"^  {clock} {row}\s+[\d.]+ ms\s+([\d.]+)× {said}", out, re.M)
            assert m and _ratio_ok(float(m[1]), ms[row], ms[ref]), (clock, row, m and m[0], ms)
    assert "1 intra-op thread(s)" in out


def test_bench_loader_quick(tmp_path):
    out = _run(["benchmarks/bench_loader.py", "--quick"], tmp_path, timeout=120)
    for row in ("shards (memmap), seq 2048", "parquet streaming: build", "parquet streaming: serving"):
        assert row in out, out
    # rows/s and tokens/s agree (tokens = rows x 2048): a table reporting one from another run, or
    # the wrong sequence length, fails; no rate is judged
    for m in re.finditer(r"seq (\d+), batch \d+\s+\|\s+([\d,]+) rows/s \|\s+([\d.]+) M tokens/s", out):
        rows, tok = float(m[2].replace(",", "")), float(m[3])
        assert rows > 0 and tok == pytest.approx(rows * int(m[1]) / 1e6, rel=0.03, abs=0.06), m[0]
    assert len(re.findall(r"rows/s \|", out)) == 2, out


def test_gpu_check_is_shellcheck_clean():
    from needs import need_tool

    need_tool("shellcheck", "apt-get install shellcheck (launch/ci_services.sh does)")
    p = subprocess.run(["shellcheck", "benchmarks/gpu_check.sh", "benchmarks/gpu_wheelhouse.sh"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_gpu_check_plumbing_on_cpu(tmp_path):
    """The script's overrides, the gpu_step.py driver, the smoke's checks and the table, on 2 CPU
    processes (tiny model, no compile, fp32; the float8 run emulated, stock TorchTitan's Trainer
    included): not a GPU check, only that the script still matches the
    trainer's config keys and that the smoke's checks run, document-level weights and the
    document-mask check included (CPU attention is document-causal too)."""
    env = dict(os.environ, NPROC="2", STEPS="3", WARMUP="1", SEQ="32", LOCAL_BATCH="2", RUN_TIMEOUT="150",
               CONFIG="train_configs/debug_cpu.toml", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               ALLOW_CPU="1", FLOAT8_EMULATE="1", SMOKE_SEQ="64", SMOKE_STEPS="3", SMOKE_TIMEOUT="150",
               WHEELHOUSE=str(tmp_path / "no_wheelhouse"), SITE=str(tmp_path / "site"))
    p = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out"), "--model.flavor", "tiny", "--compile.enable", "false",
         "--training.mixed_precision_param", "float32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,  # 5 launches of 2 processes
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for check in ("finite_losses", "weights_sum_to_1", "no_graph_capture", "document_mask"):
        assert f"smoke: {check:17s} ok" in p.stdout, p.stdout[-3000:]
    assert "smoke: document_mask" in p.stdout and "smoke: ok" in p.stdout
    assert '"body_calls_per_step": [2, 2, 2], "micro_batches": 2' in p.stdout  # 8 rows per rank per step, 4 per micro-batch
    for row in ("titan_rw uniform", "titan_rw LinUpper", "titan_rw LinUpper float8", "stock TorchTitan"):
        assert f"| {row:24s} |" in p.stdout, p.stdout[-3000:]
    for ratio in ("titan_rw LinUpper / titan_rw uniform: step time", "titan_rw uniform / stock TorchTitan: step time",
                  "titan_rw LinUpper float8 / titan_rw LinUpper: step time"):
        assert ratio in p.stdout, p.stdout[-3000:]
    assert "float8 run: 10 Linear layers in float8" in p.stdout  # tiny: 2 blocks x 5, lm_head not
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


def test_gpu_check_takes_pyprojects_torch_range(tmp_path):
    """A stub `torch` (only its version and no CUDA) first on PYTHONPATH: 2.11.0 and 2.15.0 pass the
    range check (refused next, for the missing CUDA device), 2.10.0 and 2.16.0 are outside the range."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    for version, inside in (("2.11.0", True), ("2.15.0+cu130", True), ("2.10.0", False), ("2.16.0", False)):
        (stub / "__init__.py").write_text(
            "import types\n"
            f"__version__ = {version!r}\n"
            "cuda = types.SimpleNamespace(is_available=lambda: False)\n"
            "version = types.SimpleNamespace(cuda='13.0')\n")
        line = _gpu_check_fails(tmp_path, ALLOW_CPU="0", PYTHONPATH=str(tmp_path / "stub"))
        assert line.startswith(f"gpu_check: unusable torch: {version} "), line
        if inside:
            assert "sees no CUDA device" in line, line
        else:
            assert "is outside the range titan_rw supports (torch>=2.11.0,<2.16, pyproject.toml)" in line, line


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

"""torch 2.15 (issue 21 §3), the newest release in pyproject.toml's range, on a real torch 2.15.0
environment checked against this one (torch 2.13).

The environment is made by `PIP_CONFIG_FILE=/dev/null bash launch/setup_torch_env.sh 2.15.0` (CI:
`.ci/run`; this machine's pip config caps torch at 2.14.1) and found through
TITAN_RW_TORCH215_PYTHON (default `.venv-torch215/bin/python`). Without it these tests skip and say
why; with TITAN_RW_REQUIRE_TORCH215=1 (CI) they fail instead (tests/torch_envs.py).

- On torch 2.15.0 (a CUDA wheel, with triton, no GPU here): TorchTitan's trainer imports, exactly
  three compat patches apply (cpu_device, sdpa_attention, force_sum_reduce: docs/design.md §3),
  TorchTitan keeps its own `spmd_types` default and triton kernels module, and
  tests/test_compat.py's machine test passes there (not skipped).
- Training (tests/torch_envs.py's smoke): 1 process, and 2 gloo ranks SIGKILLed after step 3 then
  resumed from step 2 on torch 2.15, have the per-step losses, weights and gradient norms of the same
  runs on this torch, bit for bit.
"""

from __future__ import annotations

import subprocess

import pytest

from torch_envs import ROOT, env, other_python, py_json, train_equals_this_torch, this_torch_reference

pytestmark = pytest.mark.slow
THREE = ["cpu_device", "sdpa_attention", "force_sum_reduce"]


@pytest.fixture(scope="module")
def py215() -> str:
    return other_python("2.15")


def test_patches_on_torch215(py215, tmp_path):
    r = py_json(py215, """
import json, sys, torch, titan_rw
import torchtitan.trainer, titan_rw.train  # TorchTitan and titan_rw's trainer import at all
from torchtitan.config.configs import ParallelismConfig
k = sys.modules["torchtitan.distributed.minimal_async_ep.kernels"]
print(json.dumps(dict(version=torch.__version__, cuda=torch.cuda.is_available(),
                      applied=list(titan_rw.compat.applied_patches()), summary=titan_rw.compat.summary(),
                      spmd=ParallelismConfig().spmd_backend, stub=getattr(k, "__titan_rw_stub__", False))))
""", tmp_path)
    assert r["version"].startswith("2.15.0"), r
    if r["cuda"]:
        pytest.skip("a GPU is visible: the CPU patches do not apply")
    assert r["applied"] == THREE, r
    assert f"torch {r['version']}, patches applied: {', '.join(THREE)}" in r["summary"]
    assert r["spmd"] == "spmd_types" and not r["stub"]
    p = subprocess.run([py215, "launch/torch_range.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # inside the range; the distribution's version (PyPI's CUDA wheel: "2.15.0", torch says "2.15.0+cu132")
    assert p.returncode == 0 and p.stdout.strip() == r["version"].split("+")[0], p.stdout + p.stderr


def test_compat_machine_test_passes_on_torch215(py215, tmp_path):
    test = "tests/test_compat.py::test_this_machine_gets_all_six_and_torchtitan_trainer_imports"
    p = subprocess.run([py215, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", test], cwd=ROOT,
                       env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"PASSED {test}" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]


def test_train_on_torch215_equals_this_torch(py215, tmp_path, tmp_path_factory):
    log = train_equals_this_torch(py215, tmp_path, "t215", this_torch_reference(tmp_path_factory))
    assert "torch 2.15.0" in log and "patches applied: " + ", ".join(THREE) in log

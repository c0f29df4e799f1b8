"""The compat layer: every patch applied here, and each guard shown both ways.

Each case runs in a fresh interpreter, since the patches act at import time.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ["triton_stub", "cpu_device", "set_timeout", "sdpa_attention", "partial_dtensor", "force_sum_reduce"]


def run_py(code: str, env_extra: dict | None = None, pythonpath: list[str] | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(pythonpath or []), ROOT, env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_this_machine_gets_all_six_and_torchtitan_trainer_imports():
    r = run_py(
        """
        import json, datetime
        import titan_rw
        import torchtitan.trainer
        from torchtitan.tools import utils
        from torchtitan.components import metrics
        from torchtitan.config.configs import ParallelismConfig
        import torchtitan.distributed.fsdp as tt_fsdp
        import torch.distributed as dist
        k = __import__("sys").modules["torchtitan.distributed.minimal_async_ep.kernels"]
        try:
            k.copy_rows_to_peers_kernel()
            stub_raises = False
        except RuntimeError as e:
            stub_raises = "triton" in str(e)
        dm = utils.device_module
        print(json.dumps(dict(
            applied=list(titan_rw.compat.applied_patches()),
            again=list(titan_rw.compat.apply()),
            device_type=utils.device_type, metrics_device_type=metrics.device_type,
            current_device=dm.current_device(), name=isinstance(dm.get_device_name(), str),
            total=dm.get_device_properties().total_memory > 0, stats=dm.memory_stats(),
            spmd=ParallelismConfig().spmd_backend,
            wrapped=getattr(tt_fsdp.disable_fsdp_gradient_division, "__titan_rw_patched__", False),
            set_timeout=hasattr(dist, "set_timeout"), stub_raises=stub_raises,
            attn=titan_rw.compat.attention_backend(),
            summary=titan_rw.compat.summary(),
        )))
        """
    )
    if r["applied"] != ALL:
        pytest.skip(f"not the CPU torch 2.13 machine the patches target: {r['applied']}")
    assert r["again"] == ALL  # idempotent
    assert r["device_type"] == r["metrics_device_type"] == "cpu"
    assert r["current_device"] == 0 and r["name"] and r["total"] and r["stats"] == {}
    assert r["spmd"] == "partial_dtensor"
    assert r["wrapped"] and r["set_timeout"] and r["stub_raises"]
    assert r["attn"] == "sdpa"
    assert all(n in r["summary"] for n in ALL)


def test_guards_off_where_not_needed(tmp_path):
    """A triton on the path, a torch with set_timeout, an accelerator and CUDA, torch 2.14:
    no patch is applied and TorchTitan keeps its own defaults."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    r = run_py(
        """
        import json, sys, torch, torch._utils, torch.distributed as dist
        marker = lambda timeout, group=None: None
        dist.set_timeout = marker
        torch._utils._get_available_device_type = lambda: "cuda"
        torch.cuda.is_available = lambda: True
        torch.__version__ = "2.14.0"
        import titan_rw
        from torchtitan.config.configs import ParallelismConfig
        print(json.dumps(dict(
            applied=list(titan_rw.compat.applied_patches()),
            stub="torchtitan.distributed.minimal_async_ep.kernels" in sys.modules,
            kept_set_timeout=dist.set_timeout is marker,
            spmd=ParallelismConfig().spmd_backend,
            attn=titan_rw.compat.attention_backend(),
            hooks=sorted(titan_rw.compat._hooks),
        )))
        """,
        pythonpath=[str(tmp_path)],
    )
    assert r["applied"] == []
    assert not r["stub"] and r["kept_set_timeout"]
    assert r["spmd"] == "spmd_types" and r["attn"] is None and r["hooks"] == []


def test_each_guard_on_alone(tmp_path):
    """Only the triton guard flips (triton present): the other five still apply; only
    set_timeout flips: the other five apply."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    r = run_py(
        "import json, titan_rw; print(json.dumps(list(titan_rw.compat.applied_patches())))",
        pythonpath=[str(tmp_path)],
    )
    if "set_timeout" not in r:  # a newer torch here
        pytest.skip("torch already has set_timeout")
    assert r == [p for p in ALL if p != "triton_stub"]
    r = run_py(
        "import json, torch.distributed as d; d.set_timeout = print; import titan_rw;"
        "print(json.dumps(list(titan_rw.compat.applied_patches())))"
    )
    assert r == [p for p in ALL if p != "set_timeout"]


def test_force_sum_reduction_on_gloo_fsdp():
    """Patch 6 acts: after TorchTitan's disable_fsdp_gradient_division every FSDP module
    reduces with a plain SUM, and a backward runs on gloo (which has no PREMUL_SUM)."""
    r = run_py(
        """
        import json, os, torch, titan_rw
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from torchtitan.distributed.fsdp import disable_fsdp_gradient_division
        dist.init_process_group("gloo", rank=0, world_size=1)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        fully_shard(m[0]); fully_shard(m)
        disable_fsdp_gradient_division(m)
        flags = [g.force_sum_reduction_for_comms for mod in m.modules()
                 if hasattr(mod, "_get_fsdp_state")
                 for g in [mod._get_fsdp_state()._fsdp_param_group] if g is not None]
        m(torch.randn(3, 4)).sum().backward()
        dist.destroy_process_group()
        print(json.dumps(dict(flags=flags)))
        """,
        env_extra=dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000)),
    )
    assert r["flags"] and all(r["flags"])

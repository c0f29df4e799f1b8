"""The compat layer: every patch applied here, and each guard shown both ways.

Each case runs in a fresh interpreter, since the patches act at import time.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, subprocess_env  # noqa: E402
ALL = ["triton_stub", "cpu_device", "set_timeout", "sdpa_attention", "partial_dtensor", "force_sum_reduce"]


def run_py(code: str, env_extra: dict | None = None, pythonpath: list[str] | None = None,
           env_drop: tuple[str, ...] = ()) -> dict:
    env = subprocess_env(pythonpath=pythonpath or (), drop=env_drop, **(env_extra or {}))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_this_machine_gets_all_six_and_torchtitan_trainer_imports():
    """The six base patches this machine's torch calls for, by facts read before titan_rw is imported
    (triton importable, an accelerator, CUDA, `set_timeout`, the version): all six on the CPU torch
    2.13 here; on a CUDA wheel (2.14, 2.15: triton, `set_timeout`) without a GPU only cpu_device,
    sdpa_attention and force_sum_reduce (tests/test_torch215.py runs this test on torch 2.15). Where
    triton is present the kernels module is TorchTitan's own and is never called (it needs a GPU)."""
    r = run_py(
        """
        import json, datetime, importlib.util, sys
        import torch, torch.distributed as dist
        v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        facts = dict(triton=importlib.util.find_spec("triton") is not None,
                     accelerator=torch.accelerator.is_available(),
                     cuda=torch.cuda.is_available(), set_timeout=hasattr(dist, "set_timeout"), before_2_14=v < (2, 14))
        import titan_rw
        import torchtitan.trainer
        from torchtitan.tools import utils
        from torchtitan.components import metrics
        from torchtitan.config.configs import ParallelismConfig
        import torchtitan.distributed.fsdp as tt_fsdp
        k = sys.modules["torchtitan.distributed.minimal_async_ep.kernels"]
        stub = getattr(k, "__titan_rw_stub__", False)
        stub_raises = None
        if stub:
            try:
                k.copy_rows_to_peers_kernel()
                stub_raises = False
            except RuntimeError as e:
                stub_raises = "triton" in str(e)
        dm = utils.device_module
        print(json.dumps(dict(
            facts=facts, stub=stub, kernels_file=getattr(k, "__file__", ""),
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
    f = r["facts"]
    want = [name for name, needed in (
        ("triton_stub", not f["triton"]), ("cpu_device", not f["accelerator"]), ("set_timeout", not f["set_timeout"]),
        ("sdpa_attention", not f["cuda"]), ("partial_dtensor", f["before_2_14"]), ("force_sum_reduce", not f["accelerator"]),
    ) if needed]
    assert [p for p in r["applied"] if p in ALL] == want, (r["applied"], f)
    assert r["again"] == r["applied"]  # idempotent
    assert all(n in r["summary"] for n in want)
    if f["triton"]:  # TorchTitan's real kernels module, imported, not called
        assert not r["stub"] and r["stub_raises"] is None and r["kernels_file"].endswith("kernels.py"), r
    else:
        assert r["stub"] and r["stub_raises"]
    if not f["accelerator"]:
        assert r["device_type"] == r["metrics_device_type"] == "cpu"
        assert r["current_device"] == 0 and r["name"] and r["total"] and r["stats"] == {}
        assert r["wrapped"]
    assert r["spmd"] == ("partial_dtensor" if f["before_2_14"] else "spmd_types")
    assert r["set_timeout"]  # torch's own or the alias
    assert r["attn"] == (None if f["cuda"] else "sdpa")


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


# ---------------------------------------------------------------------------- patch 11
_TORCHRUN_ENV = ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT",
                 "WORLD_SIZE", "RANK", "LOCAL_RANK")
_WRAPPED = """
import json, titan_rw
import torchtitan.distributed.utils as du
f = du.init_distributed
print(json.dumps(dict(applied=list(titan_rw.compat.applied_patches()),
                      wrapped=hasattr(f, "__wrapped__"),
                      inner=getattr(getattr(f, "__wrapped__", None), "__module__", None))))
"""


@pytest.mark.parametrize("count", [None, "0"])
def test_restart_rendezvous_not_in_a_first_attempt(count):
    """Patch 11 is not applied in torchrun's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0):
    TorchTitan's init_distributed is its own (the restart case is the test below)."""
    r = run_py(_WRAPPED, env_extra={} if count is None else {"TORCHELASTIC_RESTART_COUNT": count},
               env_drop=_TORCHRUN_ENV)
    assert "restart_rendezvous" not in r["applied"] and r["applied"], r
    assert not r["wrapped"] and r["inner"] is None


_RENDEZVOUS = """
import json, os, socket, titan_rw
from datetime import timedelta
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore
import torchtitan.distributed.utils as du
from torchtitan.config.configs import CommConfig


class Recorder(dist.Store):  # an in-process store that remembers the keys written to it
    def __init__(self):
        super().__init__()
        self.d, self.keys = {}, []
    def set(self, k, v):
        self.keys.append(k); self.d[k] = v
    def get(self, k):
        return self.d[k]
    def add(self, k, n):
        self.keys.append(k); self.d[k] = str(int(self.d.get(k, b"0")) + n).encode(); return int(self.d[k])
    def compare_set(self, k, e, v):
        self.keys.append(k); self.d[k] = v; return v
    def check(self, ks):
        return all(k in self.d for k in ks)
    def wait(self, ks, t=None):
        pass
    def num_keys(self):
        return len(self.d)
    def set_timeout(self, t):
        pass
    def delete_key(self, k):
        return self.d.pop(k, None) is not None


# the keys a plain 1-process gloo rendezvous writes, and the same keys under the attempt's prefix
# (joined by torch's own PrefixStore)
plain_init = dist.init_process_group
rec = Recorder()
plain_init("gloo", store=rec, rank=0, world_size=1, timeout=timedelta(seconds=30))
dist.destroy_process_group()
plain_keys = sorted(set(rec.keys))
joined = Recorder()
for k in plain_keys:
    PrefixStore("titan_rw/attempt_2/", joined).set(k, b"")

agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
if agent:  # torchrun's agent store: the workers only connect to it
    store = TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
world = du.init_distributed(CommConfig(init_timeout_seconds=30))
restored = dist.init_process_group is plain_init
backend, size = dist.get_backend(), dist.get_world_size()
if not agent:  # rank 0 of the wrapper made the store (alive while the group is): connect as a client
    store = TCPStore("127.0.0.1", port, 1, is_master=False, timeout=timedelta(seconds=30))
has_prefixed = [store.check([k]) for k in joined.keys]
has_plain = [store.check([k]) for k in plain_keys]
dist.destroy_process_group()
print(json.dumps(dict(applied=list(titan_rw.compat.applied_patches()),
                      inner=getattr(getattr(du.init_distributed, "__wrapped__", None), "__module__", None),
                      world=world, restored=restored, backend=backend, size=size, plain_keys=plain_keys,
                      prefixed=joined.keys, has_prefixed=has_prefixed, has_plain=has_plain)))
"""


@pytest.mark.parametrize("agent_store", [True, False])
def test_restart_rendezvous_initializes_gloo_through_the_attempts_prefix(agent_store):
    """Patch 11 is applied in a restart (attempt 2) and wraps TorchTitan's init_distributed. The wrapped init_distributed really builds a 1-process gloo group,
    its rendezvous keys land in the store under "titan_rw/attempt_2/" (and none without it), on
    torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE=True) and on a store rank 0 makes itself;
    torch.distributed.init_process_group is restored afterwards."""
    env = {"TORCHELASTIC_RESTART_COUNT": "2"}
    if agent_store:
        env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    r = run_py(_RENDEZVOUS, env_extra=env, env_drop=_TORCHRUN_ENV)
    assert "restart_rendezvous" in r["applied"] and r["inner"] == "torchtitan.distributed.utils"  # wrapped
    assert r["world"] == 1 and r["size"] == 1 and r["backend"] == "gloo" and r["restored"]
    assert r["plain_keys"], r  # the rendezvous writes something to the store
    assert all(k.startswith("titan_rw/attempt_2/") for k in r["prefixed"]) and len(r["prefixed"]) == len(r["plain_keys"])
    assert all(r["has_prefixed"]), r
    assert not any(r["has_plain"]), r

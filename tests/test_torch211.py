"""torch 2.11 (issue 12 §4): the compat shims that let TorchTitan 0.3.0 run on it, and a smoke run on
a real torch 2.11.0 environment checked against this one (torch 2.13).

The second environment is made by `launch/setup_torch211.sh` (CI: `.ci/run`) and found through
TITAN_RW_TORCH211_PYTHON (default: `.venv-torch211/bin/python` in the repo). Without it the tests that
need it skip and say why; with TITAN_RW_REQUIRE_TORCH211=1 (CI) they fail instead.

- The shims' logic, here: `trunc_normal_2_13` draws bitwise what this torch's `trunc_normal_` draws
  (both of its sampling branches); the `create_block_mask` wrapper drops torch 2.13's keywords at
  their defaults and refuses other values.
- On torch 2.11: the three shims are applied; the stand-in `DataParallelMeshDims` refuses to be built;
  TorchTitan's own FlexAttention document mask (through the wrapper) equals torch 2.13's block for
  block; `nn.init.trunc_normal_` gives torch 2.13's numbers for one seed.
- Training (tiny model, 4 steps, checkpoint every 2): 1 process, and 2 gloo ranks SIGKILLed after
  step 3 then resumed from step 2 on torch 2.11, have the per-step losses, weights and gradient norms
  of the same runs on torch 2.13, bit for bit (the init backport is on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from titan_rw import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PY = os.path.join(ROOT, ".venv-torch211", "bin", "python")


def _python211() -> str:
    py = os.environ.get("TITAN_RW_TORCH211_PYTHON") or DEFAULT_PY
    reason = None
    if not os.access(py, os.X_OK):
        reason = (f"no torch 2.11 environment at {py}: run `bash launch/setup_torch211.sh` "
                  "(or set TITAN_RW_TORCH211_PYTHON)")
    else:
        p = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0 or not p.stdout.startswith("2.11."):
            reason = f"{py} is not a torch 2.11 python: {(p.stdout + p.stderr).strip()[-300:]}"
    if reason:
        if os.environ.get("TITAN_RW_REQUIRE_TORCH211") == "1":
            pytest.fail(reason + " (TITAN_RW_REQUIRE_TORCH211=1)")
        pytest.skip(reason)
    return py


@pytest.fixture(scope="module")
def py211() -> str:
    return _python211()


def _env(tmp) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(str(tmp), "inductor")
    env["OMP_NUM_THREADS"] = "1"  # torch 2.11's CPU run is ~10x slower with 2 OpenMP threads on 2 cores
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    env.pop("TITAN_RW_TRUNC_NORMAL_2_13", None)
    return env


def _py_json(python: str, code: str, tmp) -> dict:
    p = subprocess.run([python, "-c", textwrap.dedent(code)], cwd=ROOT, env=_env(tmp), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"{python} exited {p.returncode}\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------- the shims' logic, on this torch
def test_trunc_normal_backport_draws_what_torch_2_13_draws():
    from titan_rw.compat import trunc_normal_2_13

    if compat.torch_before(2, 13):
        pytest.skip(f"the reference is torch 2.13's own trunc_normal_; this is torch {torch.__version__}")
    # (mean, std, a, b): TorchTitan's two Llama inits (normal draws, redrawn outside [a, b]) and two
    # narrow intervals (< 30 % of the mass: uniform proposals, accepted by density ratio)
    cases = [(0.0, 0.02, -2.0, 2.0), (0.0, 0.01, -0.03, 0.03), (0.0, 1.0, -0.2, 0.3), (1.0, 2.0, 0.0, 0.5)]
    for i, (mean, std, a, b) in enumerate(cases):
        ref, got = torch.empty(300, 7), torch.empty(300, 7)
        torch.manual_seed(i)
        torch.nn.init.trunc_normal_(ref, mean, std, a, b)
        torch.manual_seed(i)
        with pytest.warns(UserWarning) if mean > b + 2 * std or mean < a - 2 * std else _nullcontext():
            trunc_normal_2_13(got, mean, std, a, b)
        assert torch.equal(got, ref), (mean, std, a, b)
        assert float(got.min()) >= a and float(got.max()) <= b
        gen_ref, gen_got = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        assert torch.equal(torch.nn.init.trunc_normal_(torch.empty(50), mean, std, a, b, generator=gen_ref),
                           trunc_normal_2_13(torch.empty(50), mean, std, a, b, generator=gen_got))
    meta = torch.empty(3, device="meta")
    assert trunc_normal_2_13(meta) is meta


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_create_block_mask_wrapper_drops_defaults_and_refuses_the_rest():
    from titan_rw.compat import BLOCK_MASK_KWARG_DEFAULTS, _tolerant_create_block_mask

    calls = []

    def old_create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False):
        calls.append((mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, _compile))
        return "mask"

    f = _tolerant_create_block_mask(old_create_block_mask)
    assert f("m", 2, None, 64, 64, device="cpu", BLOCK_SIZE=16, separate_full_blocks=True,
             compute_dq_write_order=False, dq_kv_order=True) == "mask"
    assert calls[-1] == ("m", 2, None, 64, 64, "cpu", 16, False)
    assert f("m", 1, 1, 8, 8, "cpu", 8, False, True, False, True) == "mask"  # all positional
    assert calls[-1] == ("m", 1, 1, 8, 8, "cpu", 8, False)
    n = len(calls)
    for key, default in BLOCK_MASK_KWARG_DEFAULTS.items():
        with pytest.raises(NotImplementedError, match=rf"\({key}={not default!r}\) needs torch >= 2.13"):
            f("m", 1, 1, 8, 8, **{key: not default})
    with pytest.raises(NotImplementedError, match="separate_full_blocks=False"):
        f("m", 1, 1, 8, 8, "cpu", 8, False, False)
    assert len(calls) == n  # nothing refused reached the old function


# --------------------------------------------------------------------------- on a real torch 2.11
_MASK_CODE = """
def document_mask():
    # TorchTitan's FlexAttention document mask for rows of packed documents (positions restart at 0),
    # built eagerly (TorchTitan compiles create_block_mask; the eager call is the same function)
    import torch
    from titan_rw import models
    cfg = models.model_config("debug", attn_backend="flex")
    with torch.device("meta"):
        model = cfg.build()
    lengths = [[40, 88, 128], [256], [1, 100, 50, 105]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch._dynamo.config.patch(disable=True):
        m = model.get_attention_masks(positions)
    m = getattr(m, "block_mask", m)
    out = {k: getattr(m, k).tolist() for k in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")}
    out["block_size"] = list(m.BLOCK_SIZE)
    return out
"""


@pytest.mark.slow
def test_shims_on_torch211(py211, tmp_path):
    """On torch 2.11: TorchTitan imports; the three shims are applied and logged; the stand-in
    refuses to be built; TorchTitan's FlexAttention document mask (the GPU default), built through
    the wrapper, equals this torch's block for block; one seed gives this torch's initial weights."""
    r = _py_json(py211, _MASK_CODE + """
import json, torch, titan_rw
import torch.distributed.fsdp as fsdp
import torchtitan.trainer, titan_rw.train  # TorchTitan imports at all
from torch.nn.attention.flex_attention import create_block_mask
try:
    fsdp.DataParallelMeshDims(shard="fsdp")
    refused = ""
except NotImplementedError as e:
    refused = str(e)
try:
    create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 256, 256, device="cpu", separate_full_blocks=False)
    refused_mask = ""
except NotImplementedError as e:
    refused_mask = str(e)
torch.manual_seed(3)
w = torch.empty(64, 48)
torch.nn.init.trunc_normal_(w, std=0.02)
print(json.dumps(dict(applied=list(titan_rw.compat.applied_patches()), refused=refused, refused_mask=refused_mask,
                      summary=titan_rw.compat.summary(), w=w.flatten().tolist(), mask=document_mask())))
""", tmp_path)
    for name in ("mesh_dims_standin", "block_mask_kwargs", "trunc_normal_2_13", "partial_dtensor"):
        assert name in r["applied"], r["applied"]
    assert "torch 2.11.0" in r["summary"] and "trunc_normal_2_13" in r["summary"]
    assert "DataParallelMeshDims" in r["refused"] and "partial_dtensor" in r["refused"]
    assert "create_block_mask(separate_full_blocks=False) needs torch >= 2.13" in r["refused_mask"]
    # independent check of the block structure: row 1 is one document of 256 tokens in 2 blocks of
    # 128, so block (1, 0) is full and the diagonal ones partial; in row 0 the second query block is
    # the third document alone, which sees nothing of the first block
    got = r["mask"]
    assert got["block_size"] == [128, 128]
    assert got["full_kv_num_blocks"][1][0] == [0, 1] and got["kv_num_blocks"][1][0] == [1, 1]
    assert got["full_kv_num_blocks"][0][0] == [0, 0] and got["kv_num_blocks"][0][0] == [1, 1]
    if compat.torch_before(2, 13):
        pytest.skip(f"the references are torch 2.13's; this is torch {torch.__version__}")
    ns: dict = {}
    exec(_MASK_CODE, ns)
    ref = ns["document_mask"]()
    for k in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "block_size"):
        assert got[k] == ref[k], k
    torch.manual_seed(3)
    assert torch.equal(torch.tensor(r["w"]), torch.nn.init.trunc_normal_(torch.empty(64, 48), std=0.02).flatten())


# ------------------------------------------------------------------------------------ training smoke
STEPS = 4
COMMON = [
    "--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny", "--training.steps", str(STEPS),
    "--training.seq_len", "32", "--training.local_batch_size", "8", "--training.global_batch_size", "16",
    "--logging.log_interval", "1", "--reweight.warmup_steps", "1", "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
    "--metrics.enable_tensorboard", "false", "--job.deterministic", "true",
]
KEYS = ("loss", "weighted_loss", "max_weight", "grad_norm", "lr", "temperature", "ess")


def _train_cmd(python, folder, nproc, *extra):
    launch = [python, "-m", "titan_rw.train"] if nproc == 1 else [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "titan_rw.train"]
    return [*launch, *COMMON, "--job.dump_folder", folder, *extra]


def _wait(procs, expect):
    out = []
    for (name, p, log), want in zip(procs, expect):
        rc = p.wait(timeout=600)
        log.close()
        with open(log.name) as fh:
            text = fh.read()
        ok = rc == want if want != "nonzero" else rc != 0
        assert ok, f"{name}: exit {rc} (expected {want})\n{text[-6000:]}"
        out.append(text)
    return out


def _start(name, cmd, tmp):
    log = open(os.path.join(str(tmp), f"{name}.log"), "w")
    return name, subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp), stdout=log, stderr=subprocess.STDOUT), log


def _metrics(folder):
    from titan_rw.observability import read_metrics

    return {r["step"]: r for r in read_metrics(folder)}


@pytest.mark.slow
def test_train_on_torch211_equals_torch213(py211, tmp_path):
    d = lambda name: os.path.join(str(tmp_path), name)  # noqa: E731
    # 1 process on each torch at once (one core each), then 2 ranks: this torch, then torch 2.11
    # SIGKILLed after step 3 (checkpoint step-2 on disk) and resumed
    _wait([_start("ref1", _train_cmd(sys.executable, d("ref1"), 1), tmp_path),
           _start("t211_1", _train_cmd(py211, d("t211_1"), 1), tmp_path)], [0, 0])
    _wait([_start("ref2", _train_cmd(sys.executable, d("ref2"), 2), tmp_path)], [0])
    _wait([_start("t211_2_kill", _train_cmd(py211, d("t211_2"), 2, "--fault_injection.kill_at_step", "3"), tmp_path)],
          ["nonzero"])
    (log,) = _wait([_start("t211_2_resume", _train_cmd(py211, d("t211_2"), 2), tmp_path)], [0])
    assert "resumed from the checkpoint of step 2" in log
    assert "torch 2.11.0" in log and "trunc_normal_2_13" in log
    for ref_name, got_name in (("ref1", "t211_1"), ("ref2", "t211_2")):
        ref, got = _metrics(d(ref_name)), _metrics(d(got_name))
        assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1)), (ref_name, sorted(got))
        for s in ref:
            for k in KEYS:
                assert got[s][k] == ref[s][k], (got_name, s, k, got[s][k], ref[s][k])  # bit for bit
    assert all(m["loss"] == m["loss"] for m in _metrics(d("t211_2")).values())  # finite, trained

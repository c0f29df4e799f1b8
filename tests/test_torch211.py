"""torch 2.11 (issue 12 §4): the compat shims that let TorchTitan 0.3.0 run on it, and a smoke run on
a real torch 2.11.0 environment checked against this one (torch 2.13).

The second environment is made by `launch/setup_torch_env.sh 2.11.0` (CI: `.ci/run`) and found through
TITAN_RW_TORCH211_PYTHON (default: `.venv-torch211/bin/python` in the repo). Without it the tests that
need it skip and say why; with TITAN_RW_REQUIRE_TORCH211=1 (CI) they fail instead (tests/torch_envs.py).

- The shims' logic, here: `trunc_normal_2_13` draws bitwise what this torch's `trunc_normal_` draws
  (both of its sampling branches); the `create_block_mask` wrapper drops torch 2.13's keywords at
  their defaults and refuses other values.
- On torch 2.11: the three shims are applied; the stand-in `DataParallelMeshDims` refuses to be built;
  TorchTitan's own FlexAttention document mask (through the wrapper) equals torch 2.13's block for
  block; `nn.init.trunc_normal_` gives torch 2.13's numbers for one seed.
- Training (tiny model, 4 steps, checkpoint every 2): 1 process, and 2 gloo ranks SIGKILLed after
  step 3 then resumed from step 2 on torch 2.11, have the per-step losses, weights and gradient norms
  of the same runs on torch 2.13, bit for bit (the init backport is on).
- `make setup VENV=<the torch 2.11 environment>` (launch/setup.sh) keeps torch 2.11.0: the same
  distribution, not reinstalled (issue 21 §2; in this file, so no other test uses that environment
  while pip runs in it).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from titan_rw import compat
from torch_envs import other_python, py_json, train_equals_this_torch, this_torch_reference

from helpers import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def py211() -> str:
    return other_python("2.11")


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
    r = py_json(py211, _MASK_CODE + """
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
@pytest.mark.slow
def test_train_on_torch211_equals_torch213(py211, tmp_path, tmp_path_factory):
    log = train_equals_this_torch(py211, tmp_path, "t211", this_torch_reference(tmp_path_factory))
    assert "torch 2.11.0" in log and "trunc_normal_2_13" in log


# ------------------------------------------------------------------------------ launch/setup.sh
def _torch_dist(python: str) -> tuple[str, str]:
    """(version, RECORD's content) of the torch distribution `python` sees: the same files and
    hashes after a no-op install, a new RECORD after a reinstall."""
    p = subprocess.run([python, "-c", "import importlib.metadata as m; d = m.distribution('torch'); "
                        "print(d.version); print(d.read_text('RECORD'))"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    version, _, record = p.stdout.partition("\n")
    return version, record


@pytest.mark.slow
def test_make_setup_keeps_torch211(py211):
    venv = os.path.dirname(os.path.dirname(py211))
    before = _torch_dist(py211)
    p = subprocess.run(["make", "setup", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert before[0].startswith("2.11.0"), before[0]
    assert f"torch {before[0]} already present: keeping it" in p.stdout, p.stdout
    assert _torch_dist(py211) == before  # the same distribution, files and hashes: not reinstalled
    ready = [ln for ln in p.stdout.splitlines() if ln.startswith("[setup] ready: titan_rw")]  # make[1] may wrap it
    assert len(ready) == 1 and f"torch {before[0]}" in ready[0], p.stdout

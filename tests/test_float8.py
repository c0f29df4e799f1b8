"""float8 training (`[float8]`, titan_rw.float8) on CPU: TorchTitan 0.3.0's Float8LinearConverter with
`emulate = true`, eager, the tiny model, real gloo ranks, real DCP checkpoints.

- 2 ranks (tests/float8_worker.py): every Linear of the blocks is a torchao Float8Linear and the
  output projection `lm_head` is not; per-sample losses on the same rows and weights within 1e-3
  (relative) of the same trainer without float8, and not equal to them (float8 rounding ran); the
  weights of every group of a float8 step sum to 1; the parameters are plain fp32 tensors;
- 2 ranks, SIGKILL after step 3 (checkpoint of step 2), resumed: step 3 again, bit for bit; the
  checkpoint then resumes in a run without float8 (1 process) and exports to Hugging Face with the
  checkpoint's tensors;
- the refusals (torchao missing, emulate with compile, no float8 GPU) are one-line ConfigErrors; a
  Linear with a dimension not divisible by 16 stays high precision; a float8 `lm_head` is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from titan_rw import config as C
from titan_rw import float8, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("torchao", reason="float8 needs torchao: pip install 'titan_rw[float8]' (the [test] extra has it)")
REL_TOL = 1e-3  # float8 (e4m3, rowwise/tensorwise scales) vs fp32 per-sample loss, tiny model at init


def _env(tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1", RW_DUMP=str(tmp / "dump"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def _run(cmd, tmp, expect_ok=True, timeout=300):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return p


@pytest.mark.slow
def test_float8_modules_losses_weights_two_ranks(tmp_path):
    out = tmp_path / "res.json"
    _run(_torchrun(2, os.path.join(ROOT, "tests", "float8_worker.py"), str(out)), tmp_path)
    r = json.loads(out.read_text())
    blocks = [n for n in r["plain_linears"] if n.startswith("layers.")]
    assert len(blocks) == 2 * 5  # tiny: 2 blocks x (wqkv, wo, w1, w2, w3)
    assert r["f8_modules"] == sorted(blocks)  # every Linear of the blocks ...
    assert "lm_head" in r["f8_linears"] and "lm_head" not in r["f8_modules"]  # ... not the output projection
    assert r["plain_float8_modules"] == []
    assert r["same_param_names"] and r["plain_tensor_params"]
    ref, f8 = torch.tensor(r["losses"]["plain"]), torch.tensor(r["losses"]["f8"])
    assert ref.shape == f8.shape == (16,)  # 2 micro-batches x 2 ranks x 4 rows
    rel = ((f8 - ref).abs() / ref).max().item()
    assert rel <= REL_TOL, rel
    assert (f8 - ref).abs().max().item() > 0  # the float8 matmuls ran (an unconverted model is identical)
    assert r["group_sizes"] == [8, 8]  # each micro-batch is a group over both ranks
    assert all(abs(s - 1.0) < 1e-5 for s in r["weight_sums"]), r["weight_sums"]
    assert r["grad_norm_finite"]


RUN = ["--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny", "--training.seq_len", "32",
       "--training.local_batch_size", "4", "--training.global_batch_size", "8", "--logging.log_interval", "1",
       "--reweight.warmup_steps", "1", "--lr_scheduler.warmup_steps", "1", "--checkpoint.interval", "2",
       "--checkpoint.keep_latest_k", "0", "--metrics.enable_tensorboard", "false", "--job.deterministic", "true",
       "--data.loader", "synthetic"]
FLOAT8 = ["--float8.enable", "true", "--float8.emulate", "true"]


def _rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


@pytest.mark.slow
def test_float8_sigkill_resume_exact_then_plain_run_and_hf_export(tmp_path):
    run = str(tmp_path / "run")
    train = [*RUN, "--job.dump_folder", run]
    p = _run(_torchrun(2, "-m", "titan_rw.train", *train, *FLOAT8, "--training.steps", "4",
                       "--fault_injection.kill_at_step", "3"), tmp_path, expect_ok=False)
    assert p.returncode != 0, (p.stdout + p.stderr)[-3000:]
    killed = {r["step"]: r for r in _rows(run)}
    assert sorted(killed) == [1, 2, 3], sorted(killed)
    _run(_torchrun(2, "-m", "titan_rw.train", *train, *FLOAT8, "--training.steps", "4"), tmp_path)
    resumed = _rows(run)[len(killed):]
    assert [r["step"] for r in resumed] == [3, 4]
    for k in ("loss", "weighted_loss", "max_weight", "grad_norm", "lr"):
        assert resumed[0][k] == killed[3][k], (k, resumed[0][k], killed[3][k])  # bit for bit

    # the float8 run's checkpoint resumes in a run without float8 (1 process)
    p = _run([sys.executable, "-m", "titan_rw.train", *train, "--training.steps", "5"], tmp_path)
    assert "resumed from the checkpoint of step 4" in p.stdout + p.stderr
    assert "titan_rw float8:" not in p.stdout + p.stderr  # no float8 layer in this run
    assert "float8.enable was True, is now False" in p.stdout + p.stderr  # the resume says what changed (checkpointing.LOGGED)
    last = _rows(run)[-1]
    assert last["step"] == 5 and abs(last["loss"] - resumed[-1]["loss"]) < 0.5, (last, resumed[-1])

    # ... and exports to Hugging Face (step 4: the float8 run's last checkpoint)
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from titan_rw.export import export_hf

    hf = tmp_path / "hf"
    export_hf(run, hf, step=4)
    dcp_to_torch_save(os.path.join(run, "checkpoint", "step-4"), tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    ck = ck.get("model", ck)
    st = load_file(hf / "model.safetensors")
    for ours, theirs in (("lm_head.weight", "lm_head.weight"), ("tok_embeddings.weight", "model.embed_tokens.weight"),
                         ("layers.1.feed_forward.w2.weight", "model.layers.1.mlp.down_proj.weight")):
        assert torch.equal(st[theirs], ck[ours].float()), ours
    shutil.rmtree(hf)


def test_refusals_are_one_line_config_errors(monkeypatch):
    base = ["--model.flavor", "tiny", "--data.loader", "synthetic", "--float8.enable", "true"]
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.load(None, [*base, "--float8.emulate", "true", "--compile.enable", "true"]), "cfg.toml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cfg.toml: float8.emulate = true") and "compile.enable = false" in msg
    if not float8.float8_hardware():
        with pytest.raises(C.ConfigError) as e:
            C.validate(C.load(None, base), "cfg.toml")
        msg = str(e.value)
        assert "\n" not in msg and "compute capability 8.9" in msg and "float8.emulate = true" in msg, msg
    monkeypatch.setitem(sys.modules, "torchao", None)  # find_spec("torchao") -> None: not installed
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.load(None, [*base, "--float8.emulate", "true"]), "cfg.toml")
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'titan_rw[float8]'" in msg, msg
    C.validate(C.load(None, ["--model.flavor", "tiny", "--data.loader", "synthetic"]), "cfg.toml")  # off: no torchao needed


def test_keys_are_torchtitans_and_off_by_default():
    from torchtitan.components.quantization.float8 import Float8LinearConverter

    ours = set(C.section_fields("float8"))
    theirs = {f for f in Float8LinearConverter.Config.__dataclass_fields__}
    assert ours - {"enable"} <= theirs and ours == {"enable", "recipe_name", "filter_fqns", "emulate"}
    assert C.resolved(C.load(None, []))["float8"]["enable"] is False
    for name in ("debug_cpu", "llama_1p4b", "llama_7b"):
        text = open(os.path.join(ROOT, "train_configs", f"{name}.toml")).read()
        assert "[float8]" in text, name
        values = C.load(os.path.join(ROOT, "train_configs", f"{name}.toml"))
        assert values["float8"]["enable"] is False and set(values["float8"]) == ours, name


def test_dims_not_divisible_by_16_and_the_output_projection_stay_high_precision(monkeypatch):
    from torchtitan.models.common import Linear

    # dim 64, FFN hidden 172 (multiple_of 4): attention 64->192, 64->64 convert; the FFN (172) cannot
    monkeypatch.setitem(models.FLAVORS, "odd", models.Flavor(dim=64, n_layers=1, n_heads=4, vocab_size=2048,
                                                              max_seq_len=128, multiple_of=4))
    assert models.flavor("odd").ffn_hidden % 16 != 0
    cfg = float8.Float8Config(enable=True, emulate=True, filter_fqns=["wo"]).convert(models.model_config("odd"))
    kinds = {fqn: type(c).__qualname__ for fqn, c, _, _ in cfg.traverse(Linear.Config)}
    assert kinds == {"lm_head": "Linear.Config", "layers.0.attention.qkv_linear.wqkv": "Float8Linear.Config",
                     "layers.0.attention.wo": "Linear.Config",  # the user's filter_fqns
                     "layers.0.feed_forward.w1": "Linear.Config", "layers.0.feed_forward.w2": "Linear.Config",
                     "layers.0.feed_forward.w3": "Linear.Config"}, kinds


def test_a_float8_output_projection_is_refused():
    """A converter without `lm_head` in filter_fqns (a Config built in Python) converts it: refused."""
    from torchtitan.components.quantization.float8 import Float8LinearConverter

    cfg = Float8LinearConverter.Config(emulate=True).build().convert(models.model_config("tiny"))
    model = cfg.build()
    with pytest.raises(ValueError) as e:
        float8.check_model(model)
    assert "\n" not in str(e.value) and "'lm_head' was converted to float8" in str(e.value)

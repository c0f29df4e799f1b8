"""The GPU configs' code paths, exercised on CPU with the real `ReweightTrainer` (tiny model).

- no CUDA-graph capture of the reweighted step, for every shipped config (TorchTitan 0.3.0 wraps
  `_forward_backward_body` by default on NVIDIA GPUs; a replay would skip the step's host-side
  state), and `training.disable_cuda_graphs = false` refused before compute;
- TP / CP / PP refused by the trainer itself, with a message;
- on 2 gloo ranks: bf16 parameters with fp32 reduction (the 1.4B/7B setting) against fp32, and HSDP
  (a 2-D data-parallel mesh, dp_replicate 2 × dp_shard 1) against FSDP.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from titan_rw import config as C
from titan_rw.trainer import ReweightTrainer

from helpers import ROOT, subprocess_env  # noqa: E402
WORKER = os.path.join(ROOT, "tests", "gpu_paths_worker.py")
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "train_configs", "*.toml")))


def _env(tmp_path):
    return subprocess_env(tmp_path, drop=("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"),
                          MASTER_PORT=str(29600 + os.getpid() % 300))


def _run(cmd, tmp_path, timeout=400):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]


@pytest.mark.slow
def test_no_shipped_config_runs_the_step_under_cuda_graph_capture(tmp_path):
    assert {"debug_cpu.toml", "llama_1p4b.toml", "llama_7b.toml"} <= set(CONFIGS)
    out = tmp_path / "out.json"
    _run([sys.executable, WORKER, "cuda_graphs", str(out), str(tmp_path / "dump")], tmp_path)
    res = json.loads(out.read_text())
    assert set(res) == {*CONFIGS, "python_default"}
    for name, r in res.items():
        assert r["plain_body"] and not r["wrapped"], (name, r)  # fwd_bwd_fn is the body itself
        assert r["disable_cuda_graphs"] is True, (name, r)
        assert len(r["log"]) == 1 and "CUDA-graph capture of the step is off" in r["log"][0], (name, r)
    # a Config built in Python has TorchTitan's default (capture on): the trainer turns it off and says so
    assert "forced" in res["python_default"]["log"][0]
    assert "forced" not in res["debug_cpu.toml"]["log"][0]


def test_disable_cuda_graphs_false_is_refused_before_compute():
    with pytest.raises(C.ConfigError) as e:
        C.from_args("train_configs/llama_1p4b.toml", ["--training.disable_cuda_graphs", "false"], world_size=64)
    msg = str(e.value)
    assert "command-line" in msg and "training.disable_cuda_graphs = false is not supported" in msg
    for name in CONFIGS:  # the shipped configs resolve to no capture
        cfg = C.from_args(f"train_configs/{name}", world_size=2 if "debug" in name else 64)
        assert cfg.training.disable_cuda_graphs is True
        assert cfg.run_values["training"]["disable_cuda_graphs"] is True


@pytest.mark.parametrize("key", ["tensor_parallel_degree", "context_parallel_degree", "pipeline_parallel_degree"])
def test_trainer_itself_refuses_tp_cp_pp(key, tmp_path):
    cfg = C.from_args("train_configs/debug_cpu.toml", ["--model.flavor", "tiny", "--job.dump_folder", str(tmp_path)],
                      world_size=1)
    setattr(cfg.parallelism, key, 2)  # past the config loader, as a Config built in Python would be
    with pytest.raises(ValueError, match=rf"parallelism\.{key} = 2 is not supported by the reweighted step: .*"
                                         r"Set it to 1 and scale with data parallelism"):
        ReweightTrainer(cfg)  # refused before TorchTitan builds anything (no process group)
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_bf16_params_and_hsdp_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "out.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
          "paths", str(out), str(tmp_path / "dump")], tmp_path)
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for rank, res in enumerate(ranks):
        for name, r in res.items():
            assert r["rank"] == rank and r["dp_size"] == 2, (name, r)
            assert r["dp_rank"] == rank, (name, r)  # the rank in the flattened data-parallel mesh
            for s in r["steps"]:
                assert all(abs(w - 1) < 1e-5 for w in s["weight_sums"]), (name, s)  # weights sum to 1 per group
                assert s["min_weight"] >= 0
                # the ranks' slices make up the whole group: each rank kept its own slice
                assert s["sum_of_local"] == pytest.approx(s["weighted_loss"], rel=1e-5), (name, s)
    fp32, bf16, hsdp = (ranks[0][n] for n in ("fp32", "bf16", "hsdp"))
    assert "param_dtype=torch.bfloat16" in bf16["param_dtype"] and "reduce_dtype=torch.float32" in bf16["param_dtype"]
    assert "param_dtype=torch.float32" in fp32["param_dtype"]
    # HSDP: a 2-D mesh (replicate × shard); the shard dimension has one rank, so a slice taken by
    # the shard-mesh rank would be rank 0's on both ranks and the sum above would fail
    assert (hsdp["dp_replicate"], hsdp["dp_shard"], hsdp["mesh_ndim"]) == (2, 1, 2)
    assert hsdp["placements"][0] == "R" and hsdp["placements"][1].startswith("S(")
    assert (fp32["dp_replicate"], fp32["dp_shard"], fp32["mesh_ndim"]) == (1, 2, 1)
    assert [m["step"] for m in fp32["metrics"]] == [1, 2, 3]
    for a, b, c in zip(fp32["metrics"], bf16["metrics"], hsdp["metrics"]):
        for k in ("loss", "weighted_loss", "grad_norm"):
            # HSDP sums the gradients over both mesh dimensions as FSDP does: the same run
            assert c[k] == pytest.approx(a[k], rel=1e-5), (k, a, c)
            # bf16 compute: within bf16's precision of the fp32 run, and really not fp32
            assert b[k] == pytest.approx(a[k], rel=1e-2), (k, a, b)
    assert any(b["loss"] != a["loss"] for a, b in zip(fp32["metrics"], bf16["metrics"]))

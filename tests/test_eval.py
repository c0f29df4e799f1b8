"""Evaluation with lm-evaluation-harness (titan_rw.eval), offline, on a real short CPU run.

One debug-flavor run trained by the real trainer (`python -m titan_rw.train`, 20 steps, DCP
checkpoint) is shared by all tests:
- its checkpoint is evaluated on the two local tasks through `lm_eval.simple_evaluate` with the
  registered `titan_rw` model, and through `titan-rw eval` (results.json + results.md);
- the adapter's loglikelihoods equal the trainer's own per-sample loss on the same text (the
  trainer is rebuilt and loads the checkpoint through TorchTitan's CheckpointManager), and
  `evaluate_model` on the in-memory training model equals the adapter on the checkpoint;
- the trained model beats a freshly initialized one on the local rolling-loglikelihood task;
- a task whose dataset is not cached fails at once with a message naming the dataset and how to
  pre-download it, and no network connection is attempted.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, subprocess_env  # noqa: E402
STEPS = 20
SEQ = 64
TRAIN_OVERRIDES = [
    "--training.steps", str(STEPS), "--training.seq_len", str(SEQ), "--training.local_batch_size", "8",
    "--training.global_batch_size", "8", "--reweight.warmup_steps", "3", "--lr_scheduler.warmup_steps", "3",
    "--logging.log_interval", "10", "--metrics.enable_tensorboard", "false",
]


def _env(tmp):
    return subprocess_env(tmp, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp / "hf_home"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_run")
    run = tmp / "run"
    cmd = [sys.executable, "-m", "titan_rw.train", "--config", "train_configs/debug_cpu.toml", *TRAIN_OVERRIDES,
           "--checkpoint.enable", "true", "--checkpoint.interval", str(STEPS), "--job.dump_folder", str(run)]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert (run / "checkpoint" / f"step-{STEPS}" / ".metadata").is_file()
    return run


@pytest.fixture(scope="module")
def lm(run_dir):
    from titan_rw.eval.adapter import TitanRWLM

    return TitanRWLM(checkpoint=str(run_dir), max_length=SEQ, batch_size=16)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline mode + an empty HF cache + a socket guard that records any connection attempt."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", home / "datasets")
    attempts = []

    def guard(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a, **k: guard(*a))
    monkeypatch.setattr(socket, "create_connection", guard)
    monkeypatch.setattr(socket, "getaddrinfo", guard)
    return attempts


LOCAL_TASKS = ["titan_rw_local_mc", "titan_rw_local_ppl"]


def _local_tm():
    from titan_rw.eval.runner import task_manager

    return task_manager(tasks=LOCAL_TASKS)


def test_local_tasks_alone_skip_the_index_of_lm_evals_own_tasks():
    """Only shipped tasks asked for: a TaskManager of the shipped folder alone (lm-eval's thousands of
    task configs are not read); any other task: the full index, in which the shipped tasks are too."""
    from titan_rw.eval.runner import task_manager

    own = task_manager(tasks=LOCAL_TASKS)
    assert set(LOCAL_TASKS) <= set(own.task_index) and "hellaswag" not in own.task_index
    assert all(not str(e.yaml_path).startswith(os.path.dirname(__import__("lm_eval").__file__))
               for e in own.task_index.values() if getattr(e, "yaml_path", None))
    full = task_manager(tasks=["titan_rw_local_mc", "hellaswag"])
    assert full is task_manager() and {"hellaswag", *LOCAL_TASKS} <= set(full.task_index)


def test_simple_evaluate_local_tasks(run_dir, lm, offline):
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=["titan_rw_local_mc", "titan_rw_local_ppl"], task_manager=_local_tm(),
                                  limit=12, bootstrap_iters=0, log_samples=False)
    mc, ppl = res["results"]["titan_rw_local_mc"], res["results"]["titan_rw_local_ppl"]
    # acc / acc_norm recomputed from the task's own file: the first 12 documents, each choice scored
    # by the adapter's loglikelihood (itself checked against the trainer's loss below), argmax vs
    # label; acc_norm divides by the choice's length in characters. A harness fed the choices in
    # another order, with another delimiter, or our adapter answering for the wrong request, gives
    # other accuracies (a bare 0 <= acc <= 1 passes for any of them).
    import types

    import numpy as np

    with open(os.path.join(ROOT, "titan_rw", "eval", "tasks", "titan_rw_local", "mc.jsonl")) as fh:
        docs = [json.loads(line) for line in fh if line.strip()][:12]
    reqs = [types.SimpleNamespace(args=(d["context"], " " + c)) for d in docs for c in d["choices"]]
    lls = iter(ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True))
    hits, hits_norm = [], []
    for d in docs:
        ll = np.array([next(lls) for _ in d["choices"]])
        hits.append(int(np.argmax(ll)) == d["label"])
        hits_norm.append(int(np.argmax(ll / np.array([len(c) for c in d["choices"]]))) == d["label"])
    assert mc["acc,none"] == pytest.approx(np.mean(hits), abs=1e-9)
    assert mc["acc_norm,none"] == pytest.approx(np.mean(hits_norm), abs=1e-9)
    assert math.isfinite(ppl["bits_per_byte,none"]) and ppl["bits_per_byte,none"] > 0
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"], rel=1e-6)
    # the registered name, with model_args as lm_eval's CLI passes them
    res2 = lm_eval.simple_evaluate(model="titan_rw", model_args=f"checkpoint={run_dir},max_length={SEQ}",
                                   tasks=["titan_rw_local_ppl"], task_manager=_local_tm(), limit=4, bootstrap_iters=0)
    ppl4 = lm_eval.simple_evaluate(model=lm, tasks=["titan_rw_local_ppl"], task_manager=_local_tm(), limit=4,
                                   bootstrap_iters=0)["results"]["titan_rw_local_ppl"]
    assert res2["results"]["titan_rw_local_ppl"]["bits_per_byte,none"] == pytest.approx(ppl4["bits_per_byte,none"], rel=1e-6)
    assert not offline


def test_adapter_matches_trainer_loss(run_dir, tmp_path):
    out = tmp_path / "res.json"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "eval_worker.py"), str(run_dir), str(STEPS), str(out),
           "--", *TRAIN_OVERRIDES]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    r = json.loads(out.read_text())
    for train_nll, ll in zip(r["train_sum_nll"], r["adapter_rolling"]):
        assert ll == pytest.approx(-train_nll, rel=1e-5, abs=1e-3)
    assert r["adapter_ll"] == pytest.approx(-r["train_cont_nll"], rel=1e-5, abs=1e-3)
    assert r["in_memory_bpb"] == pytest.approx(r["from_disk_bpb"], rel=1e-5)


def test_trained_beats_fresh_on_rolling_task(lm, offline):
    import torch

    from titan_rw.eval.adapter import TitanRWLM, build_model
    from titan_rw.eval.periodic import flatten
    from titan_rw.eval.presets import expand
    from titan_rw.eval.runner import evaluate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh_model = build_model("debug")
        fresh_model.init_weights(buffer_device=None)
    fresh = TitanRWLM(model=fresh_model, tokenizer=lm.tok, max_length=SEQ, batch_size=16, flavor="debug")
    specs = expand("titan_rw_local_ppl")
    trained_bpb = flatten(evaluate(lm, specs))["eval/titan_rw_local_ppl/bits_per_byte"]
    fresh_bpb = flatten(evaluate(fresh, specs))["eval/titan_rw_local_ppl/bits_per_byte"]
    # a fresh model is ~uniform over 2048 pieces (~11 bits per piece); 20 steps already help a lot
    assert trained_bpb < fresh_bpb - 0.3, (trained_bpb, fresh_bpb)


def test_cli_writes_json_and_markdown(run_dir, tmp_path, offline, capsys):
    from titan_rw.eval.cli import eval_main

    out = tmp_path / "out"
    rc = eval_main([str(run_dir), "--tasks", "local", "--limit", "6", "--output", str(out), "--bootstrap-iters", "0"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["results"]) >= {"titan_rw_local_mc", "titan_rw_local_ppl"}
    assert data["titan_rw"]["step"] == STEPS and data["titan_rw"]["flavor"] == "debug"
    # flavor, tokenizer and context window from the run_config.toml the trainer saved
    assert (run_dir / "run_config.toml").is_file()
    assert data["titan_rw"]["max_length"] == SEQ
    md = (out / "results.md").read_text()
    assert "| Local continuation (MC) | titan_rw_local_mc | 0 | acc |" in md
    assert "bits_per_byte" in capsys.readouterr().out
    assert not offline


def test_missing_dataset_is_named_quickly_without_network(run_dir, offline, capsys, monkeypatch):
    """Quickly: before the model is loaded and without trying the network (both asserted; no wall-clock
    bound, which a loaded machine would break: timings belong in benchmarks/)."""
    from titan_rw.eval import adapter
    from titan_rw.eval.cli import eval_main

    loaded = []
    monkeypatch.setattr(adapter.TitanRWLM, "__init__", lambda self, *a, **k: loaded.append(k) or 1 / 0)
    rc = eval_main([str(run_dir), "--tasks", "boolq,titan_rw_local_mc,sciq"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "aps/super_glue" in err and "'boolq'" in err and "allenai/sciq" in err
    assert "HF_HOME=" in err and "--repo-type dataset" in err and "titan-rw eval --download --tasks boolq,sciq" in err
    assert "titan_rw_local_mc" not in err.split("nothing was downloaded:")[1].split("Pre-download")[0]
    assert loaded == [], "the model was loaded before the missing datasets were reported"
    assert offline == [], f"network was attempted: {offline}"


def test_compare_prints_paper_table(tmp_path, capsys):
    from titan_rw.eval.cli import eval_main

    def res(mc, boolq, bpb):
        return {"results": {"titan_rw_local_mc": {"acc,none": mc, "acc_stderr,none": 0.01},
                            "boolq": {"acc,none": boolq},
                            "titan_rw_local_ppl": {"bits_per_byte,none": bpb}}}

    a, b = tmp_path / "uniform.json", tmp_path / "linupper.json"
    a.write_text(json.dumps(res(0.40, 0.6160, 2.5)))
    b.write_text(json.dumps(res(0.45, 0.6548, 2.4)))
    assert eval_main(["--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0] == "| Benchmark | uniform | linupper | Difference |"
    assert "| BoolQ | 61.60 | 65.48 | +3.88 |" in out
    assert "| Local continuation (MC) | 40.00 | 45.00 | +5.00 |" in out
    assert "| Local rolling loglikelihood (bits_per_byte, lower is better) | 2.50 | 2.40 | -0.10 |" in out
    assert lines[-1] == "| *Mean* | *50.80* | *55.24* | *+4.44* |"

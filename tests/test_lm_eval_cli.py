"""lm-eval as its users call it (titan_rw.eval.lm_eval_cli, `titan-rw-lm-eval`), offline, real processes.

On the shared debug run and its Hugging Face export (tests/hf_helpers.py):
- lm-eval's own CLI evaluates `--model titan_rw --model_args pretrained=RUN` on the shipped local
  tasks (found without --include_path), prints lm-eval's table with stderr, writes its results JSON,
  and runs on the CPU when no device is named and there is no CUDA;
- the exported folder under lm-eval's `hf` model gets the same scores: the multiple-choice task
  as it is, the rolling-loglikelihood task with `add_bos_token=False` (lm-eval's `hf` model puts
  a second BOS before a rolling window when the tokenizer adds one; titan_rw scores one BOS, as
  the documents were trained);
- `titan-rw eval` prints lm-eval's table (with stderr) and records the model args;
- importing our adapter keeps lm-eval's own models (`hf`) resolvable.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from hf_helpers import ROOT, SEQ, env

TASKS = "titan_rw_local_mc,titan_rw_local_ppl"
LIMIT = "12"


def _results(folder) -> dict:
    files = sorted(glob.glob(os.path.join(str(folder), "**", "results_*.json"), recursive=True))
    assert files, f"no lm-eval results JSON under {folder}"
    with open(files[-1]) as f:
        return json.load(f)


@pytest.mark.slow
def test_lm_eval_cli_titan_rw_and_exported_hf_agree(trained_run, hf_folder, tmp_path):
    cli = [sys.executable, "-m", "titan_rw.eval.lm_eval_cli"]
    common = ["--limit", LIMIT, "--batch_size", "8"]
    hf_args = f"pretrained={hf_folder},max_length=256,dtype=float32"
    jobs = {
        "titan_rw": cli + ["--model", "titan_rw", "--model_args", f"pretrained={trained_run},max_length=256",
                           "--tasks", TASKS, "--output_path", str(tmp_path / "titan_rw"), *common],
        "hf_mc": cli + ["--model", "hf", "--model_args", hf_args, "--tasks", "titan_rw_local_mc",
                        "--output_path", str(tmp_path / "hf_mc"), *common],
        "hf_ppl": cli + ["--model", "hf", "--model_args", hf_args + ",add_bos_token=False",
                         "--tasks", "titan_rw_local_ppl", "--output_path", str(tmp_path / "hf_ppl"), *common],
    }
    procs = {}
    for k, c in jobs.items():  # side by side; output to files (a full pipe would stall a process)
        with open(tmp_path / f"{k}.out", "w") as o, open(tmp_path / f"{k}.err", "w") as e:
            procs[k] = subprocess.Popen(c, cwd=ROOT, env=env(tmp_path), stdout=o, stderr=e)
    outs = {}
    for k, p in procs.items():
        p.wait(timeout=900)
        out, err = (tmp_path / f"{k}.out").read_text(), (tmp_path / f"{k}.err").read_text()
        assert p.returncode == 0, f"{k}: {' '.join(jobs[k])}\n{(out + err)[-6000:]}"
        outs[k] = out
    # lm-eval's standard output: its header line and its table, stderr column included
    assert outs["titan_rw"].startswith("titan_rw (") or "\ntitan_rw (" in outs["titan_rw"]
    for k in outs:
        assert re.search(r"\|\s*Tasks\s*\|", outs[k]) and "Stderr" in outs[k] and "±" in outs[k], outs[k]
    ours, mc, ppl = _results(tmp_path / "titan_rw"), _results(tmp_path / "hf_mc"), _results(tmp_path / "hf_ppl")
    assert ours["config"]["device"] == mc["config"]["device"] == "cpu"  # no --device, no CUDA: the CPU
    a, b = ours["results"]["titan_rw_local_mc"], mc["results"]["titan_rw_local_mc"]
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    assert a["acc_stderr,none"] == pytest.approx(b["acc_stderr,none"], rel=1e-9)
    a, b = ours["results"]["titan_rw_local_ppl"], ppl["results"]["titan_rw_local_ppl"]
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert a[metric] == pytest.approx(b[metric], rel=1e-5), metric


def test_lm_eval_argv_adds_task_path_and_cpu(monkeypatch):
    from titan_rw.eval import TASKS_DIR
    from titan_rw.eval import lm_eval_cli as m

    monkeypatch.setattr(m, "_cuda_available", lambda: False)
    argv = m.lm_eval_argv(["--model", "titan_rw", "--tasks", "titan_rw_local_mc"])
    assert argv[0] == "run" and argv[argv.index("--include_path") + 1] == TASKS_DIR
    assert argv[argv.index("--device") + 1] == "cpu"
    argv = m.lm_eval_argv(["run", "--model", "hf", "--device", "cuda:1", "--include_path=/mine", "--tasks", "x"])
    assert argv.count("--device") == 1 and "--include_path" not in argv and "--include_path=/mine" in argv
    assert m.lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks", "--include_path", TASKS_DIR]
    monkeypatch.setattr(m, "_cuda_available", lambda: True)
    assert "--device" not in m.lm_eval_argv(["--model", "titan_rw", "--tasks", "x"])
    # the console script is declared
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'titan-rw-lm-eval = "titan_rw.eval.lm_eval_cli:main"' in f.read()


def test_adapter_import_keeps_lm_eval_models():
    import titan_rw.eval.adapter as adapter
    from lm_eval.api.registry import get_model

    from titan_rw.eval.lm_eval_cli import register

    register()
    assert get_model("titan_rw") is adapter.TitanRWLM
    assert get_model("hf").__name__ == "HFLM"


def test_titan_rw_eval_shows_lm_eval_table_and_model_args(trained_run, tmp_path, monkeypatch, capsys):
    from titan_rw.eval.cli import eval_main

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    out = tmp_path / "eval"
    assert eval_main([str(trained_run), "--tasks", "local", "--limit", "6", "--bootstrap-iters", "20",
                      "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "titan_rw (pretrained=" in printed and re.search(r"\|\s*Tasks\s*\|", printed) and "Stderr" in printed
    acc_rows = [line for line in printed.splitlines() if re.search(r"\|acc\s*\|", line)]
    assert acc_rows and all("±" in line and "N/A" not in line for line in acc_rows), acc_rows  # stderr shown
    data = json.loads((out / "results.json").read_text())
    args = dict(kv.split("=", 1) for kv in data["config"]["model_args"].split(","))
    assert data["config"]["model"] == "titan_rw"
    assert args["pretrained"].endswith(f"step-10") and args["max_length"] == str(SEQ) and args["device"] == "cpu"
    assert args["flavor"] == "debug"
    md = (out / "results.md").read_text()
    assert re.search(r"\|\s*Tasks\s*\|", md) and "| Benchmark |" in md

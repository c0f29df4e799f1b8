"""A quiet console and help that helps (titan_rw.progress, titan_rw.cli, titan_rw.train).

- the shared short debug run's console (tests/hf_helpers.py, a real `python -m titan_rw.train` on
  CPU, output to a pipe) has no TorchTitan GPU-only warning, no ANSI colour code, tokens/s on its
  progress lines, and ends with the summary: final loss, the outputs, the next commands;
- `ConsoleFilter` keeps warnings that matter, and the GPU-only ones on a GPU;
- `titan-rw --version`, `titan-rw tokenizer --help`, `titan-rw experiment` print help (exit 0);
  `titan-rw train --help` lists the config sections and `--keys` every key.
"""

import json
import logging
import re

import pytest

GPU_ONLY = ("lspci", "fallback to A100", "Peak FLOPS used for computing MFU", "memory usage for model: -",
            "CUDA graph", "DTensor random operators", "initial_load_model_only=True has no effect")


def test_training_console_is_quiet_and_ends_with_a_summary(trained_run):
    text = (trained_run.parent / "console.txt").read_text()
    for noise in GPU_ONLY:
        assert noise not in text, noise
    assert "\x1b[" not in text
    steps = [line for line in text.splitlines() if re.search(r"step \d+/\d+ \(", line)]
    assert steps and all(re.search(r"[\d,.]+[MG]? tok/s", line) for line in steps), steps
    rows = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tail = text[text.index("titan_rw: finished"):]
    assert f"final loss {rows[-1]['loss']:.4f}" in tail
    for want in (str(trained_run / "checkpoint"), str(trained_run / "metrics.jsonl"),  # (TensorBoard is off there)
                 f"titan-rw report {trained_run}", f"titan-rw eval {trained_run}", f"titan-rw export {trained_run} --hf"):
        assert want in tail, want


def test_console_filter_drops_gpu_noise_only_on_cpu_and_strips_colour():
    import io

    from titan_rw.progress import ConsoleFilter

    def emit(cpu, tty, *msgs):
        buf = io.StringIO()
        log = logging.getLogger(f"titan_rw.test_console.{cpu}.{tty}")
        log.propagate = False
        h = logging.StreamHandler(buf)
        h.addFilter(ConsoleFilter(cpu=cpu, strip_ansi=not tty))
        log.handlers = [h]
        for m in msgs:
            log.warning(m)
        return buf.getvalue()

    noise = "Peak flops undefined for: x86_64, fallback to A100"
    real = "Warmup steps (20) exceed total steps (3). Adjusting warmup steps to 3."
    out = emit(True, False, noise, real, "\x1b[34mModel llama debug \x1b[31msize: 4,458,752\x1b[39m")
    assert noise not in out and real in out and "Model llama debug size: 4,458,752" in out and "\x1b" not in out
    out = emit(False, True, noise, "\x1b[34mcolour\x1b[39m")
    assert noise in out and "\x1b[34m" in out  # a GPU run on a terminal keeps both


def test_help_version_and_groups(capsys):
    from titan_rw import __version__
    from titan_rw.cli import main
    from titan_rw.train import train_main

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"titan-rw {__version__}"
    assert main(["tokenizer", "--help"]) == 0 and "tokenizer {train}" in capsys.readouterr().out
    assert main(["experiment"]) == 0 and "toy-regression" in capsys.readouterr().out
    assert main(["experiment", "nope"]) == 2 and "unknown 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "[reweight]" in out and "[checkpoint]" in out and "--keys" in out
    assert train_main(["--keys", "reweight"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[reweight]") and re.search(r"^  strategy = 'linupper'", out, re.M)


def test_progress_line_shows_tokens_per_second():
    from titan_rw.progress import Progress

    row = {"step": 5, "loss": 1.0, "max_weight": 0.01, "max_weight_bound": 0.0156, "tokens_per_sec": 12345.6}
    assert "12,346 tok/s" in Progress(total=10).row_line(row)

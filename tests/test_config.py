"""TOML ⇄ Trainer.Config: the shipped configs build, overrides apply, bad configs are rejected
before any compute with a message naming the file and the key."""

import os

import pytest

from titan_rw import config as C

from helpers import ROOT  # noqa: E402
DEBUG = os.path.join(ROOT, "train_configs", "debug_cpu.toml")


def write(tmp_path, text, name="run.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name,world", [("debug_cpu", 1), ("debug_cpu", 2), ("llama_1p4b", 64), ("llama_7b", 128)])
def test_shipped_configs_build(name, world):
    cfg = C.from_args(os.path.join(ROOT, "train_configs", f"{name}.toml"), world_size=world)
    assert cfg.model_spec is not None and cfg.reweight.strategy == "linupper"
    assert cfg.checkpoint.last_save_model_only is False
    assert cfg.parallelism.spmd_backend == "partial_dtensor"
    if name != "debug_cpu":
        t = cfg.training
        assert (t.global_batch_size, t.seq_len) == (128, 8192)
        assert cfg.optimizer.param_groups[0].optimizer_kwargs["lr"] == 3e-4
        assert cfg.optimizer.param_groups[0].optimizer_kwargs["weight_decay"] == 0.01
        assert cfg.lr_scheduler.warmup_steps == 2000 and cfg.lr_scheduler.decay_type == "cosine"
        assert cfg.lr_scheduler.min_lr_factor == pytest.approx(0.1)
        assert t.max_norm == 1.0 and t.mixed_precision_param == "bfloat16"
        # selective AC, as the paper's configs need to fit 8192 tokens: a config that lost the
        # section builds None (no recomputation, out of memory at 7B), one that read mode as "full"
        # builds FullAC (every block recomputed, ~1/3 more compute); both fail here
        from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

        assert cfg.compile.enable
        assert isinstance(cfg.activation_checkpoint, SelectiveAC.Config), cfg.activation_checkpoint
        assert not isinstance(cfg.activation_checkpoint, FullAC.Config)
        assert cfg.reweight.warmup_temperature == 100.0 and cfg.reweight.warmup_steps == 2000
        assert (t.steps, cfg.reweight.temperature) == ((100_000, 1.0) if name == "llama_1p4b" else (170_000, 2.0))


def test_cli_overrides_apply_with_types():
    cfg = C.from_args(DEBUG, ["--training.steps", "7", "--reweight.strategy", "quadratic", "--reweight.cap=2",
                              "--job.dump_folder", "/tmp/123", "--compile.enable", "true", "--reweight.cap", "none",
                              "--optimizer.lr", "1e-3"])
    assert cfg.training.steps == 7 and cfg.reweight.strategy == "quadratic" and cfg.reweight.cap is None
    assert cfg.dump_folder == "/tmp/123" and cfg.compile.enable is True
    assert cfg.optimizer.param_groups[0].optimizer_kwargs["lr"] == 1e-3


def test_toml_round_trip(tmp_path):
    values = C.load(DEBUG)
    again = C.load(write(tmp_path, C.to_toml(values)))
    assert again == values


@pytest.mark.parametrize(
    "text,overrides,world,needles",
    [
        ("[trainig]\nsteps = 3\n", [], 1, ["run.toml", "unknown section [trainig]"]),
        ("[training]\nstepz = 3\n", [], 1, ["run.toml", "unknown key training.stepz"]),
        ("[training]\nsteps = \"ten\"\n", [], 1, ["run.toml", "training.steps must be int"]),
        ("[reweight]\ncap = true\n", [], 1, ["run.toml", "reweight.cap must be"]),
        ("[model]\nflavor = \"13B\"\n", [], 1, ["run.toml", "model.flavor", "'13B'", "1.4B"]),
        ("[reweight]\nstrategy = \"softmax\"\n", [], 1, ["run.toml", "reweight.strategy", "linupper"]),
        ("[model]\nflavor = \"debug\"\n[training]\nseq_len = 4096\n", [], 1, ["run.toml", "training.seq_len 4096", "2048"]),
        ("[training]\nlocal_batch_size = 8\nglobal_batch_size = 24\n", [], 2,
         ["run.toml", "training.global_batch_size 24", "local_batch_size 8", "data-parallel degree 2"]),
        ("[parallelism]\ntensor_parallel_degree = 2\n", [], 2, ["run.toml", "parallelism.tensor_parallel_degree"]),
        ("[reweight]\ncap = 0.5\n", [], 1, ["run.toml", "cap"]),
        ("[reweight]\ntemperature = 0.0\n", [], 1, ["run.toml", "temperature"]),
        ("[reweight]\nscope = \"epoch\"\n", [], 1, ["run.toml", "reweight.scope", "global_batch"]),
        ("steps = 3\n", [], 1, ["run.toml", "must be a [section]"]),
        ("", ["--training.steps", "abc"], 1, ["command line --training.steps", "must be int"]),
        ("", ["--training.nope", "1"], 1, ["command line --training.nope", "unknown key"]),
        ("", ["training.steps", "1"], 1, ["expected --section.key value"]),
        ("", ["--model.flavor", "70B"], 1, ["model.flavor", "'70B'"]),
    ],
)
def test_rejections_name_file_and_key(tmp_path, text, overrides, world, needles):
    path = write(tmp_path, text)
    with pytest.raises(C.ConfigError) as e:
        C.from_args(path, overrides, world_size=world)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_missing_file():
    with pytest.raises(C.ConfigError, match="not found"):
        C.load("/nonexistent/x.toml")


# ---------------------------------------------------------------------------- [logging], run config
MOVED = ("log_interval", "histogram_interval", "samples_interval", "top_k", "max_weight_window", "metrics_file")
SYNTH = "[data]\nloader = \"synthetic\"\n"  # no tokenizer check: these tests are about sections


def test_deprecated_reweight_logging_keys_move_with_a_warning(tmp_path, caplog):
    path = write(tmp_path, SYNTH + "[reweight]\nlog_interval = 3\n")
    with caplog.at_level("WARNING", logger="titan_rw"):
        cfg = C.from_args(path, ["--reweight.top_k", "2"], world_size=1)
    assert cfg.logging.log_interval == 3 and cfg.logging.top_k == 2
    assert cfg.metrics.log_freq == 3  # TorchTitan's console cadence follows [logging]
    assert "log_interval" not in cfg.run_values["reweight"] and "top_k" not in cfg.run_values["reweight"]
    assert cfg.run_values["logging"]["log_interval"] == 3 and cfg.run_values["logging"]["top_k"] == 2
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    (toml_msg,) = [m for m in msgs if "reweight.log_interval" in m]
    assert "deprecated" in toml_msg and "logging.log_interval" in toml_msg and "run.toml" in toml_msg
    (cli_msg,) = [m for m in msgs if "reweight.top_k" in m]
    assert "deprecated" in cli_msg and "logging.top_k" in cli_msg and "command line --reweight.top_k" in cli_msg
    # every moved key, and nothing else, is in the table
    assert {k for (s, k), new in C.DEPRECATED_KEYS.items() if s == "reweight" and new == "logging"} == set(MOVED)
    assert not set(MOVED) & set(C.section_fields("reweight"))


def test_logging_section_keys_work_and_unknown_keys_are_refused(tmp_path, caplog):
    text = SYNTH + "[logging]\nlog_interval = 4\nhistogram_interval = 8\nsamples_interval = 12\ntop_k = 5\n" \
                   "max_weight_window = 7\nmetrics_file = \"m.jsonl\"\n"
    with caplog.at_level("WARNING", logger="titan_rw"):
        cfg = C.from_args(write(tmp_path, text), ["--logging.bound_c", "3"], world_size=1)
    lg = cfg.logging
    assert (lg.log_interval, lg.histogram_interval, lg.samples_interval, lg.top_k, lg.max_weight_window,
            lg.metrics_file, lg.bound_c) == (4, 8, 12, 5, 7, "m.jsonl", 3.0)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    with pytest.raises(C.ConfigError) as e:
        C.from_args(write(tmp_path, SYNTH + "[logging]\nlog_intervall = 4\n", "bad.toml"), world_size=1)
    assert "bad.toml" in str(e.value) and "logging.log_intervall" in str(e.value) and "[logging]" in str(e.value)
    with pytest.raises(C.ConfigError, match=r"command line --logging.nope.*unknown key logging.nope.*\[logging\]"):
        C.from_args(None, ["--logging.nope", "1"], world_size=1)
    with pytest.raises(C.ConfigError, match=r"\[logging\] logging.log_interval must be >= 1, got 0"):
        C.from_args(None, ["--data.loader", "synthetic", "--logging.log_interval", "0"], world_size=1)


def test_fault_injection_is_in_the_run_config_only_when_used(tmp_path):
    plain = C.from_args(None, ["--data.loader", "synthetic"], world_size=1)
    assert "fault_injection" not in plain.run_values
    assert {"reweight", "logging", "fault", "training", "data"} <= set(plain.run_values)
    used = C.from_args(None, ["--data.loader", "synthetic", "--fault_injection.kill_at_step", "3"], world_size=1)
    fi = used.run_values["fault_injection"]
    assert fi["kill_at_step"] == 3 and fi["nan_loss_steps"] == [] and fi["kill_rank"] == -1
    assert used.fault_injection.kill_at_step == 3
    # set back to its default: still left out
    again = C.from_args(None, ["--data.loader", "synthetic", "--fault_injection.kill_at_step", "0"], world_size=1)
    assert "fault_injection" not in again.run_values


def test_save_run_config_round_trips(tmp_path):
    import json

    cfg = C.from_args(DEBUG, ["--fault_injection.kill_at_step", "3", "--reweight.cap", "2.5",
                              "--logging.top_k", "4", "--job.description", 'a "quoted" \\ path'], world_size=1)
    values = cfg.run_values
    out = tmp_path / "run"
    C.save_run_config(str(out), values)
    with open(out / "config.json") as fh:
        assert json.load(fh) == values
    back = C.load(str(out / "run_config.toml"))
    # the TOML leaves out None values (TOML has no null); everything else is there, typed
    assert back == {s: {k: v for k, v in t.items() if v is not None} for s, t in values.items()}
    assert C.resolved(back) == values
    assert back["fault_injection"]["kill_at_step"] == 3 and back["reweight"]["cap"] == 2.5
    assert back["logging"]["top_k"] == 4 and back["job"]["description"] == 'a "quoted" \\ path'
    assert C.from_args(str(out / "run_config.toml"), world_size=1).run_values == values

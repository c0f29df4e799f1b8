"""TOML run configs ⇄ TorchTitan 0.3.0 `Trainer.Config`.

A run is one TOML file (`train_configs/*.toml`) with TorchTitan-style sections; any key can
be overridden on the command line as `--section.key value` (or `--section.key=value`).
Everything is checked before any compute: unknown sections and keys, wrong types, and
impossible combinations (global batch not divisible by local batch × DP degree, seq_len over
the model's maximum, unknown flavor or strategy, unsupported parallelism), each error naming
the file (or the command line) and the key.

Sections mapped 1:1 onto TorchTitan's dataclasses accept exactly those dataclasses' fields:
`[training]` TrainingConfig, `[lr_scheduler]` LRSchedulersContainer.Config,
`[checkpoint]` CheckpointManager.Config, `[metrics]` MetricsProcessor.Config,
`[parallelism]` ParallelismConfig, `[compile]` CompileConfig, `[comm]` CommConfig,
`[profiler]` Profiler.Config. Sections of titan_rw's components, each beside its code:
`[reweight]` titan_rw.reweight.ReweightConfig, `[logging]` titan_rw.observability.run_logger.RunLogger.Config,
`[fault]` titan_rw.faults.StopGuard.Config, `[fault_injection]` (tests) titan_rw.fault_injection,
`[periodic_eval]` titan_rw.eval.periodic.PeriodicEvalConfig, `[float8]` titan_rw.float8.Float8Config
(TorchTitan's Float8LinearConverter keys, applied to the model config), `[run_lock]` titan_rw.runlock.RunLock.Config
(read by `titan_rw.train`, which holds the lock). `[checkpoint]` builds
titan_rw.checkpointing.ResumableCheckpointManager (TorchTitan's manager + fallback to the newest
complete checkpoint; same keys). The logging keys that used to sit in `[reweight]` (log_interval,
...) still work there, with a deprecation warning (`DEPRECATED_KEYS`).

This module sits above the trainer: it imports the components' config classes and
`ReweightTrainer.Config`, and nothing below imports it (`save_run_config` is called by
`titan_rw.train`).
Sections of our own: `[job]`, `[model]`, `[optimizer]`, `[activation_checkpoint]`, `[data]`
(see `OWN_SECTIONS`).
"""

from __future__ import annotations

import titan_rw  # noqa: F401

import dataclasses
import json
import logging
import os
import tomllib
import types
import typing
from typing import Any, Literal

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.config.configs import CommConfig, CompileConfig, DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.tools.profiler import Profiler

from titan_rw import compat, models
from titan_rw.checkpointing import ResumableCheckpointManager
from titan_rw.eval.periodic import PeriodicEvalConfig
from titan_rw.fault_injection import FaultInjection
from titan_rw.float8 import Float8Config
from titan_rw.faults import NonFiniteSkipOptimizers, StopGuard
from titan_rw.observability.run_logger import RunLogger
from titan_rw.observability.wandb_sink import require_wandb
from titan_rw.reweight import STRATEGIES, ReweightConfig
from titan_rw.runlock import RunLock
from titan_rw.trainer import ReweightTrainer

log = logging.getLogger("titan_rw")


class ConfigError(ValueError):
    """A run config that cannot work; raised before any compute."""


@dataclasses.dataclass(kw_only=True)
class JobSection:
    dump_folder: str = "./runs"
    description: str = ""
    seed: int | None = 0
    portable_init: bool = True
    """weights identical for any world size (rank 0 inits the full model and broadcasts)"""
    deterministic: bool = False
    print_config: bool = False


@dataclasses.dataclass(kw_only=True)
class ModelSection:
    flavor: str = "debug"
    attn_backend: Literal["auto", "sdpa", "flex", "flex_flash", "varlen"] = "auto"


@dataclasses.dataclass(kw_only=True)
class OptimizerSection:
    name: Literal["AdamW", "Adam"] = "AdamW"
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    implementation: Literal["for-loop", "foreach", "fused"] = "foreach"


@dataclasses.dataclass(kw_only=True)
class ActivationCheckpointSection:
    mode: Literal["none", "selective", "full"] = "none"
    preserve_rng_state: bool = True


@dataclasses.dataclass(kw_only=True)
class DataSection:
    loader: Literal["auto", "tokens", "synthetic"] = "auto"
    """auto: the token-shard loader (titan_rw.data) when available, else synthetic."""
    dataset_path: str | None = None
    """Token shards or parquet (local or fsspec); unset: the loader's embedded default corpus."""
    datasets: list[str] = dataclasses.field(default_factory=list)
    """A static mixture: several dataset paths (overrides dataset_path) ..."""
    weights: list[float] = dataclasses.field(default_factory=list)
    """... and their weights (> 0, normalized; empty = equal), e.g. DoReMi/DoGE domain weights."""
    format: Literal["auto", "shards", "parquet"] = "auto"
    """auto: datatrove .ds shards when found, else parquet tokenized on the fly."""
    shuffle: bool = True
    """A new row permutation every epoch (seeded)."""
    check_tokenizer: bool = True
    """Refuse shards whose metadata names another tokenizer."""
    tokenizer: str | None = None
    """sentencepiece .model (or a folder with tokenizer.model); unset: the shipped default."""
    num_workers: int = 0
    seed: int = 0


OWN_SECTIONS: dict[str, type] = {
    "job": JobSection,
    "model": ModelSection,
    "optimizer": OptimizerSection,
    "activation_checkpoint": ActivationCheckpointSection,
    "data": DataSection,
    "run_lock": RunLock.Config,
}
TITAN_SECTIONS: dict[str, type] = {
    "training": TrainingConfig,
    "lr_scheduler": LRSchedulersContainer.Config,
    "checkpoint": ResumableCheckpointManager.Config,
    "metrics": MetricsProcessor.Config,
    "parallelism": ParallelismConfig,
    "compile": CompileConfig,
    "comm": CommConfig,
    "profiler": Profiler.Config,
    "reweight": ReweightConfig,
    "logging": RunLogger.Config,
    "fault": StopGuard.Config,
    "fault_injection": FaultInjection.Config,
    "periodic_eval": PeriodicEvalConfig,
    "float8": Float8Config,
}
# Keys that moved: (old section, key) -> new section. They still work, with one warning each.
DEPRECATED_KEYS: dict[tuple[str, str], str] = {
    ("reweight", k): "logging"
    for k in ("log_interval", "histogram_interval", "samples_interval", "top_k", "max_weight_window", "metrics_file")
}
# Sections left out of the resolved run config (config.json) while every key is at its default.
ONLY_WHEN_USED = ("fault_injection",)
SECTIONS: dict[str, type] = {**OWN_SECTIONS, **TITAN_SECTIONS}
# Our defaults where TorchTitan's do not suit this project (docs/design.md §3).
DEFAULTS: dict[str, dict[str, Any]] = {
    "checkpoint": {"last_save_model_only": False},  # else resume fails: "Missing key ... dataloader"
    "parallelism": {"spmd_backend": "partial_dtensor"},  # spmd_types fails with FSDP on torch 2.13
    "metrics": {"enable_tensorboard": True},
    "training": {"disable_cuda_graphs": True},  # the reweighted step cannot be graph-captured
}


# ----------------------------------------------------------------------------- types
_MISSING = object()


def _strip(tp):
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def type_name(tp) -> str:
    """A key's type in words, for errors and `titan-rw train --keys`."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (a,) = typing.get_args(tp) or (Any,)
        return f"list of {type_name(a)}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp):
    """Return value as type tp, or _MISSING when it does not fit."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in typing.get_args(tp)) else _MISSING
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            v = _coerce(value, a)
            if v is not _MISSING:
                return v
        return _MISSING
    if tp is type(None):
        return None if value is None else _MISSING
    if tp is bool:
        return value if isinstance(value, bool) else _MISSING
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _MISSING
    if tp is str:
        return value if isinstance(value, str) else _MISSING
    if origin is list:
        if not isinstance(value, list):
            return _MISSING
        (a,) = typing.get_args(tp) or (Any,)
        out = [_coerce(v, a) for v in value]
        return _MISSING if any(v is _MISSING for v in out) else out
    return _MISSING


def _settable(tp) -> bool:
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return all(_settable(a) for a in typing.get_args(tp))
    if origin is list:
        return all(_settable(a) for a in typing.get_args(tp))
    return origin is Literal or tp in (bool, int, float, str, type(None), Any)


def section_fields(name: str) -> dict[str, Any]:
    """The settable keys of a section and their types."""
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if _settable(hints[f.name]) and not f.name.startswith("_")}


# ----------------------------------------------------------------------------- parsing
def parse_cli_value(raw: str):
    """A command-line value as TOML would read it; bare words stay strings."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(argv: list[str]) -> list[tuple[str, str, Any, str]]:
    """`--section.key value` / `--section.key=value` → [(section, key, value, raw)]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.key value, got {arg!r}")
        if "=" in arg:
            name, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: {arg} needs a value")
            name, raw = arg[2:], argv[i + 1]
            i += 2
        section, key = name.split(".", 1)
        out.append((section, key, parse_cli_value(raw), raw))
    return out


def _set(values: dict, section: str, key: str, value, where: str, raw: str | None = None) -> None:
    moved = DEPRECATED_KEYS.get((section, key))
    if moved is not None:
        log.warning(f"titan_rw: {where}: {section}.{key} is deprecated: it is now {moved}.{key} "
                    f"(set it there; the old key works for now)")
        section = moved
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}")
    fields = section_fields(section)
    if key not in fields:
        raise ConfigError(f"{where}: unknown key {section}.{key}; valid keys of [{section}]: {', '.join(fields)}")
    tp = fields[key]
    v = _coerce(value, tp)
    if v is _MISSING and raw is not None:  # a CLI word that TOML read as a number etc.
        v = _coerce(raw, tp)
    if v is _MISSING:
        raise ConfigError(f"{where}: {section}.{key} must be {type_name(tp)}, got {value!r}")
    values.setdefault(section, {})[key] = v


def load(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Read a TOML file and apply CLI overrides → {section: {key: value}} (typed, checked)."""
    values: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file: pass --config a TOML file "
                              f"(e.g. train_configs/debug_cpu.toml, or a run's run_config.toml)") from None
        except PermissionError:
            raise ConfigError(f"{path}: config file cannot be read (permission denied): "
                              f"make it readable or pass another --config") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8): --config needs a "
                              f"TOML file (e.g. train_configs/debug_cpu.toml)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}")
            for key, value in table.items():
                if isinstance(value, dict):
                    raise ConfigError(f"{path}: nested table [{section}.{key}] is not supported")
                _set(values, section, key, value, path)
    for section, key, value, raw in parse_overrides(list(overrides)):
        _set(values, section, key, value, f"command line --{section}.{key}", raw)
    return values


# ----------------------------------------------------------------------------- build
def build_section(values, name):
    """Section `name`'s config object from the resolved values (its defaults where unset)."""
    kw = {**DEFAULTS.get(name, {}), **values.get(name, {})}
    if name == "checkpoint" and not kw.get("initial_load_path"):
        kw.setdefault("initial_load_model_only", False)  # nothing to load: TorchTitan's True only warns
    try:
        return SECTIONS[name](**kw)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own check (__post_init__), e.g. TorchTitan's [checkpoint]
        raise ConfigError(f"[{name}] {e}") from None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def dp_degree(par: ParallelismConfig, world_size: int) -> int:
    non_dp = par.tensor_parallel_degree * par.context_parallel_degree * par.pipeline_parallel_degree
    shard = par.data_parallel_shard_degree
    if shard == -1:
        shard = world_size // (non_dp * par.data_parallel_replicate_degree)
    return par.data_parallel_replicate_degree * shard


def validate(values: dict, source: str = "config", world_size: int | None = None) -> None:
    """Impossible combinations, before any compute."""
    world_size = _world_size() if world_size is None else world_size
    m = build_section(values, "model")
    if m.flavor not in models.FLAVORS:
        raise ConfigError(f"{source}: model.flavor {m.flavor!r} is unknown; valid flavors: {', '.join(models.FLAVORS)}")
    fl = models.flavor(m.flavor)
    t = build_section(values, "training")
    if t.seq_len > fl.max_seq_len:
        raise ConfigError(
            f"{source}: training.seq_len {t.seq_len} exceeds the maximum sequence length {fl.max_seq_len} of model.flavor {m.flavor!r}"
        )
    if values.get("training", {}).get("disable_cuda_graphs") is False:
        raise ConfigError(
            f"{source}: training.disable_cuda_graphs = false is not supported: a CUDA-graph replay of the "
            "reweighted step would skip its host-side state (weights statistics, temperature, fixed "
            "global-batch weights) and train with stale values; remove the key (titan_rw keeps it true)"
        )
    for key in ("steps", "local_batch_size", "seq_len"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{source}: training.{key} must be >= 1, got {getattr(t, key)}")
    rw = build_section(values, "reweight")
    if rw.strategy not in STRATEGIES:
        raise ConfigError(f"{source}: reweight.strategy {rw.strategy!r} is unknown; valid strategies: {', '.join(STRATEGIES)}")
    try:
        rw.validate()
    except ValueError as e:
        raise ConfigError(f"{source}: [reweight] {e}") from None
    why = rw.warmup_warning(t.steps)
    if why is not None and os.environ.get("RANK", "0") == "0":  # one line per run, not one per rank
        log.warning(f"titan_rw: {source}: {why}")
    p = build_section(values, "parallelism")
    for key in ("pipeline_parallel_degree", "tensor_parallel_degree", "context_parallel_degree", "expert_parallel_degree"):
        if getattr(p, key) != 1:
            raise ConfigError(f"{source}: parallelism.{key} = {getattr(p, key)} is not supported by the reweighted step (use FSDP/HSDP)")
    dp = dp_degree(p, world_size)
    if dp < 1 or dp * p.tensor_parallel_degree * p.context_parallel_degree * p.pipeline_parallel_degree != world_size:
        raise ConfigError(
            f"{source}: parallelism degrees (dp_replicate {p.data_parallel_replicate_degree} × dp_shard "
            f"{p.data_parallel_shard_degree}) do not match the world size {world_size}"
        )
    if t.global_batch_size > 0 and t.global_batch_size % (t.local_batch_size * dp) != 0:
        raise ConfigError(
            f"{source}: training.global_batch_size {t.global_batch_size} is not divisible by "
            f"training.local_batch_size {t.local_batch_size} × data-parallel degree {dp} = {t.local_batch_size * dp}"
        )
    if t.global_batch_size == 0 or t.global_batch_size < -1:
        raise ConfigError(f"{source}: training.global_batch_size must be > 0 (or -1 for local × dp), got {t.global_batch_size}")
    d = build_section(values, "data")
    if d.loader == "tokens" and not data_loader_available():
        raise ConfigError(f"{source}: data.loader = 'tokens' but titan_rw.data.loader is not installed")
    if d.loader != "synthetic" and data_loader_available():
        _check_tokenizer(d.tokenizer, m.flavor, fl.vocab_size, source)
    raw_ck = values.get("checkpoint", {})
    if raw_ck.get("interval", 1) < 1:
        raise ConfigError(f"{source}: checkpoint.interval = {raw_ck['interval']} is not allowed: it must be >= 1 (steps between checkpoints)")
    k = raw_ck.get("keep_latest_k", 0)
    if k < 0 or k == 1:
        raise ConfigError(
            f"{source}: checkpoint.keep_latest_k = {k} is not allowed: use 0 (keep every checkpoint) or >= 2 "
            "(the newest one may still be being written when the older ones are deleted)"
        )
    _checkpoint_section(values, source)
    for name in ("logging", "fault", "run_lock"):
        try:
            build_section(values, name).validate()
        except ValueError as e:
            raise ConfigError(f"{source}: [{name}] {e}") from None
    try:
        build_section(values, "periodic_eval").validate()
        build_section(values, "float8").validate(compile_model=_compiles_model(values))
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def _compiles_model(values: dict) -> bool:
    c = build_section(values, "compile")
    return c.enable and "model" in c.components


def _check_tokenizer(path: str | None, flavor: str, vocab_size: int, source: str) -> None:
    """The tokenizer loads and fits the model's embedding (ids < vocab_size), before any compute."""
    from titan_rw.data import DEFAULT_TOKENIZER
    from titan_rw.data.tokenizer import SentencePieceTokenizer

    key = f"data.tokenizer {path!r}" if path is not None else f"the shipped tokenizer {DEFAULT_TOKENIZER}"
    try:
        n = SentencePieceTokenizer(tokenizer_path=path or DEFAULT_TOKENIZER).get_vocab_size()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: {key}: {e}") from None
    if n > vocab_size:
        raise ConfigError(
            f"{source}: {key} has {n} pieces, more than the vocabulary of model.flavor {flavor!r} "
            f"({vocab_size}): token ids >= {vocab_size} would not fit the embedding. Use a flavor with a "
            f"vocabulary of at least {n}, or a tokenizer of at most {vocab_size} pieces"
        )


def _check_writable(path: str, key: str) -> None:
    """`path` is (or can be created as) a writable folder: checked without creating anything."""
    if "://" in path:
        return  # remote storage: found at the first write
    full = os.path.abspath(path)
    p = full
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ConfigError(f"{key}: {p} is a file, where the folder {full} should be: move it or choose another {key}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}: {full} cannot be written ({p} is read-only or not writable by this user): "
            f"choose a writable {key}"
        )


def preflight(cfg) -> None:
    """Checks before the model is built: the run folder and the checkpoint folder can be written
    (a file in their place, a read-only mount), and cheap checks of the data a
    `ReweightTrainer.Config` names (paths, parquet footers and columns, texts not all null, shards
    found and made with the run's tokenizer), and the wandb package if `metrics.enable_wandb`.
    ConfigError naming the key and the path; nothing is created."""
    _check_writable(cfg.dump_folder, "job.dump_folder")
    try:
        require_wandb(cfg.metrics.enable_wandb)
    except ImportError as e:
        raise ConfigError(str(e)) from None
    ck = cfg.checkpoint
    if ck.enable and not ck.load_only:
        _check_writable(os.path.join(cfg.dump_folder, ck.folder), "checkpoint.folder")
    try:
        from titan_rw.data.loader import TokenDataLoader
        from titan_rw.data.parquet import DataError
    except ImportError:
        return
    if isinstance(cfg.dataloader, TokenDataLoader.Config):
        try:
            TokenDataLoader.preflight(cfg.dataloader, tokenizer_path=cfg.hf_assets_path or None)
        except DataError as e:
            key = "data.datasets" if cfg.dataloader.datasets else "data.dataset_path"
            raise ConfigError(f"{key}: {e}") from None


def _checkpoint_section(values: dict, source: str):
    """[checkpoint], with TorchTitan's refusals (and the Hugging Face format's needs) as one-line errors."""
    raw = {**DEFAULTS.get("checkpoint", {}), **values.get("checkpoint", {})}
    if raw.get("last_save_in_hf") and not raw.get("last_save_model_only"):
        raise ConfigError(
            f"{source}: checkpoint.last_save_in_hf = true needs checkpoint.last_save_model_only = true (the last "
            f"checkpoint is then the model's weights in Hugging Face safetensors, not resumable); or keep both "
            f"false and run `titan-rw export RUN --hf OUT` after training"
        )
    if raw.get("initial_load_in_hf"):
        if not raw.get("initial_load_model_only", True):
            raise ConfigError(f"{source}: checkpoint.initial_load_in_hf = true needs checkpoint.initial_load_model_only "
                              f"= true (a Hugging Face folder holds only the model)")
        path = raw.get("initial_load_path")
        if not path:
            tok = values.get("data", {}).get("tokenizer")
            if not (tok and _has_safetensors(tok)):
                raise ConfigError(
                    f"{source}: checkpoint.initial_load_in_hf = true needs checkpoint.initial_load_path = "
                    f"/absolute/path/to/the/hf_folder (or data.tokenizer set to that folder)"
                )
            path = tok
        elif not os.path.isabs(path):
            raise ConfigError(f"{source}: checkpoint.initial_load_path {path!r} must be an absolute path "
                              f"(e.g. {os.path.abspath(path)})")
        if not _has_safetensors(path):
            raise ConfigError(f"{source}: checkpoint.initial_load_path {path!r} is not a folder with *.safetensors "
                              f"(a Hugging Face model folder, e.g. from `titan-rw export RUN --hf OUT`)")
        _check_hf_shapes(path, build_section(values, "model").flavor, source)
    mode = raw.get("async_mode")
    if isinstance(mode, str) and mode.lower() == "async_with_pinned_mem" and not compat.has_cuda():
        raise ConfigError(
            f"{source}: checkpoint.async_mode = {mode!r} needs CUDA (it stages to pinned host memory) and this "
            f"machine has none: use \"async\" (a background thread) or \"disabled\""
        )
    try:
        return build_section(values, "checkpoint")
    except ValueError as e:
        raise ConfigError(f"{source}: [checkpoint] {e}") from None


def _has_safetensors(folder: str) -> bool:
    """`folder` is a folder holding *.safetensors (a Hugging Face model folder)."""
    return os.path.isdir(folder) and any(n.endswith(".safetensors") for n in os.listdir(folder))


def _check_hf_shapes(folder: str, flavor: str, source: str) -> None:
    """The HF folder's config.json (when there is one) must describe model.flavor's shapes."""
    import json

    cfg_file = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_file):
        return
    with open(cfg_file) as f:
        hf = json.load(f)
    fl = models.flavor(flavor)
    want = {"hidden_size": fl.dim, "num_hidden_layers": fl.n_layers, "num_attention_heads": fl.n_heads,
            "intermediate_size": fl.ffn_hidden, "vocab_size": fl.vocab_size}
    wrong = {k: (hf.get(k), v) for k, v in want.items() if k in hf and hf[k] != v}
    if wrong:
        what = ", ".join(f"{k} {a} (flavor: {b})" for k, (a, b) in wrong.items())
        raise ConfigError(f"{source}: the Hugging Face model in {folder} is not a {flavor!r} Llama: {what}; "
                          f"set model.flavor to its shape")


def data_loader_available() -> bool:
    try:
        import titan_rw.data.loader  # noqa: F401
    except ImportError:
        return False
    return True


def _data_configs(values) -> tuple[Any, Any, str]:
    """(tokenizer config, dataloader config, hf_assets_path) for the [data] section."""
    d = build_section(values, "data")
    use_tokens = d.loader == "tokens" or (d.loader == "auto" and data_loader_available())
    if use_tokens:
        from titan_rw.data import DEFAULT_TOKENIZER
        from titan_rw.data.loader import TokenDataLoader
        from titan_rw.data.tokenizer import SentencePieceTokenizer

        fields = {f.name for f in dataclasses.fields(TokenDataLoader.Config)}
        wanted = {"num_workers": d.num_workers, "seed": d.seed, "dataset_path": d.dataset_path,
                  "tokenizer_path": d.tokenizer, "datasets": list(d.datasets), "weights": list(d.weights),
                  "format": d.format, "shuffle": d.shuffle, "check_tokenizer": d.check_tokenizer}
        kw = {k: v for k, v in wanted.items() if k in fields and v is not None}
        return SentencePieceTokenizer.Config(), TokenDataLoader.Config(**kw), str(d.tokenizer or DEFAULT_TOKENIZER)
    from titan_rw.synthetic import ByteTokenizer, SyntheticDataLoader

    vocab = models.flavor(build_section(values, "model").flavor).vocab_size
    return (
        ByteTokenizer.Config(vocab_size=min(vocab, 2048)),
        SyntheticDataLoader.Config(seed=d.seed, vocab_size=min(vocab, 2048)),
        d.tokenizer or "",
    )


def build(values: dict, source: str = "config", world_size: int | None = None) -> ReweightTrainer.Config:
    """Validated {section: {key: value}} → `ReweightTrainer.Config`."""
    validate(values, source, world_size)
    job, m, opt, ac = (build_section(values, s) for s in ("job", "model", "optimizer", "activation_checkpoint"))
    spec = models.model_spec(m.flavor, None if m.attn_backend == "auto" else m.attn_backend)
    spec.model = build_section(values, "float8").convert(spec.model, compile_model=_compiles_model(values))
    tokenizer, dataloader, assets = _data_configs(values)
    ac_config = {"none": None, "selective": SelectiveAC.Config, "full": FullAC.Config}[ac.mode]
    if ac_config is not None:
        ac_config = ac_config(preserve_rng_state=ac.preserve_rng_state)
    rw = build_section(values, "reweight")
    metrics = build_section(values, "metrics")
    if "log_freq" not in values.get("metrics", {}):
        metrics.log_freq = build_section(values, "logging").log_interval
    cfg = ReweightTrainer.Config(
        model_spec=spec,
        hf_assets_path=assets,
        dump_folder=job.dump_folder,
        tokenizer=tokenizer,
        dataloader=dataloader,
        optimizer=NonFiniteSkipOptimizers.Config(
            param_groups=[
                ParamGroupConfig(
                    pattern=r".*",
                    optimizer_name=opt.name,
                    optimizer_kwargs={
                        "lr": opt.lr, "betas": (opt.beta1, opt.beta2), "eps": opt.eps, "weight_decay": opt.weight_decay,
                    },
                )
            ],
            implementation=opt.implementation,
        ),
        lr_scheduler=build_section(values, "lr_scheduler"),
        training=build_section(values, "training"),
        parallelism=build_section(values, "parallelism"),
        checkpoint=build_section(values, "checkpoint"),
        metrics=metrics,
        compile=build_section(values, "compile"),
        comm=build_section(values, "comm"),
        profiler=build_section(values, "profiler"),
        activation_checkpoint=ac_config,
        debug=DebugConfig(seed=job.seed, deterministic=job.deterministic, print_config=job.print_config),
        loss=CrossEntropyLoss.Config(global_vocab_size=models.flavor(m.flavor).vocab_size),
        reweight=rw,
        logging=build_section(values, "logging"),
        fault=build_section(values, "fault"),
        fault_injection=build_section(values, "fault_injection"),
        periodic_eval=build_section(values, "periodic_eval"),
        portable_init=job.portable_init,
        run_values=resolved(values),
    )
    return cfg


def resolved(values: dict) -> dict[str, dict[str, Any]]:
    """Every section with every settable key (defaults filled in), the tokenizer path resolved:
    what the trainer saves as <dump_folder>/config.json and run_config.toml."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        sec = build_section(values, name)
        if name in ONLY_WHEN_USED and sec == SECTIONS[name]():
            continue
        out[name] = {k: getattr(sec, k) for k in section_fields(name)}
    data = out["data"]
    if data.get("tokenizer") is None and data.get("loader") != "synthetic" and data_loader_available():
        from titan_rw.data import DEFAULT_TOKENIZER

        data["tokenizer"] = str(DEFAULT_TOKENIZER)
    return out


def from_args(path: str | None, overrides: list[str] | tuple[str, ...] = (), world_size: int | None = None):
    """TOML file + CLI overrides → a validated `ReweightTrainer.Config`."""
    values = load(path, overrides)
    source = path if not overrides else f"{path or 'config'} (with command-line overrides)"
    return build(values, source, world_size)


def save_run_config(dump_folder: str, values: dict[str, dict[str, Any]]) -> None:
    """`<dump_folder>/config.json` (every section, defaults included, resolved paths) and
    `<dump_folder>/run_config.toml` (the same as TOML: `--config` re-runs it). Rank 0, after the
    resume check (a refused config never replaces the run's)."""
    if not values:
        return
    os.makedirs(dump_folder, exist_ok=True)
    with open(os.path.join(dump_folder, "config.json"), "w") as fh:
        json.dump(values, fh, indent=1, default=str)
    try:
        toml = to_toml(values)
    except TypeError as e:  # a value TOML cannot hold: the JSON still has it
        log.warning(f"titan_rw: run_config.toml not written: {e}")
    else:
        with open(os.path.join(dump_folder, "run_config.toml"), "w") as fh:
            fh.write(toml)


def to_toml(values: dict[str, dict[str, Any]]) -> str:
    """{section: {key: value}} → TOML text (round-trips through `load`)."""
    lines = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")

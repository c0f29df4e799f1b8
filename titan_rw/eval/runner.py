"""Run lm-eval tasks on a `TitanRWLM`: offline mode, task loading with clear errors, tables.

Offline: `set_offline()` sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (and the already-imported
`datasets` / `huggingface_hub` constants), so a dataset missing from the local cache fails at
once instead of reaching for the network. `load_tasks` turns that failure into a
`MissingDatasetError` that names every missing dataset and how to pre-download it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

from titan_rw.eval import TASKS_DIR
from titan_rw.eval.presets import LOWER_IS_BETTER, TASK_PACKAGES, TaskSpec

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class MissingDatasetError(RuntimeError):
    """Tasks whose datasets are not available offline; the message says how to get them."""

    def __init__(self, missing: list[tuple[str, str, str | None, str]]):
        self.missing = missing  # (task, dataset path, dataset config, error)
        super().__init__(format_missing(missing))


def hf_home() -> str:
    return os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")


def format_missing(missing) -> str:
    lines = [
        f"lm-eval datasets are missing from the local Hugging Face cache (HF_HOME={hf_home()}) and "
        f"offline mode is on, so nothing was downloaded:"
    ]
    seen = set()
    for task, path, name, err in missing:
        lines.append(f"  - task {task}: dataset {path!r}" + (f" (config {name!r})" if name else "") + f"  [{err}]")
    tasks = ",".join(dict.fromkeys(t for t, _, _, _ in missing))
    lines.append("Pre-download them on a machine with network, with the same HF_HOME (then copy or share that folder):")
    lines.append(f"  HF_HOME={hf_home()} titan-rw eval --download --tasks {tasks}")
    lines.append("  (loads exactly what lm-eval will read into HF_HOME/datasets; no model needed). Or per dataset:")
    for task, path, name, _ in missing:
        if (path, name) in seen or path.startswith("<"):
            continue
        seen.add((path, name))
        lines.append(f"  HF_HOME={hf_home()} hf download {path} --repo-type dataset   "
                     f"# huggingface-cli download ... in older huggingface_hub")
        lines.append(f"  HF_HOME={hf_home()} python -c \"import datasets; datasets.load_dataset({path!r}, {name!r})\"")
    lines.append("Air-gapped: `datasets.load_dataset(path, name).save_to_disk(DIR)` there, and a task YAML with "
                 "dataset_path: DIR here (--include-path). --tasks local needs no download.")
    return "\n".join(lines)


def set_offline(offline: bool = True) -> None:
    """Offline (or online) mode for huggingface_hub / datasets, also when already imported."""
    value = "1" if offline else "0"
    for var in OFFLINE_VARS:
        os.environ[var] = value
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = offline
    if "datasets" in sys.modules:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = offline
        dc.HF_DATASETS_OFFLINE = offline


_TM: dict[tuple, Any] = {}


def task_manager(include_path: str | list[str] | None = None, tasks: list[str] | None = None):
    """lm-eval TaskManager that also knows the shipped local tasks (cached per include path).

    With `tasks` given and every one of them found in the shipped tasks and `include_path` alone
    (`--tasks local`, the periodic eval's default), lm-eval's own task configs (thousands of YAML
    files: ~11 s of CPU) are not indexed; any other task gets the full index."""
    paths = [TASKS_DIR] + ([include_path] if isinstance(include_path, str) else list(include_path or []))
    if tasks is not None:
        own = _task_manager(tuple(paths), include_defaults=False)
        if all(t in own.task_index for t in tasks):
            return own
    return _task_manager(tuple(paths), include_defaults=True)


def _task_manager(paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    key = (paths, include_defaults)
    if key not in _TM:
        _TM[key] = TaskManager(include_path=list(paths), include_defaults=include_defaults)
    return _TM[key]


_MISSING_PATTERNS = (
    "OfflineModeIsEnabled", "Couldn't reach", "couldn't reach", "DatasetNotFoundError", "LocalEntryNotFoundError",
    "offline mode", "Offline mode", "doesn't exist on the Hub", "Couldn't find", "ConnectionError",
)


def _is_missing_dataset(e: BaseException) -> bool:
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(x).__name__}: {x}" for x in chain)
    return any(p in text for p in _MISSING_PATTERNS) or any(isinstance(x, ConnectionError) for x in chain)


def _dataset_of(tm, task: str, err: BaseException) -> tuple[str, str | None]:
    """(dataset path, config name) a task needs: from its index entry, else from the error text."""
    entry = tm.task_index.get(task) if hasattr(tm, "task_index") else None
    cfg = (getattr(entry, "cfg", None) or {}) if entry is not None else {}
    m = re.search(r"reach '([^']+)'", str(err)) or re.search(r"[Dd]ataset '([^']+)'", str(err))
    path = m.group(1) if m else cfg.get("dataset_path")
    name = cfg.get("dataset_name") if cfg.get("dataset_path") in (None, path) else None
    return (path or "<unknown: see the error>"), name


def load_tasks(specs: list[TaskSpec], tm=None) -> list[Any]:
    """lm-eval Task/Group objects for the specs, shots set; MissingDatasetError lists all failures."""
    tm = tm or task_manager(tasks=[s.task for s in specs])
    objs, missing, unknown = [], [], []
    for spec in specs:
        if spec.task not in tm.task_index:
            unknown.append(spec.task)
            continue
        try:
            loaded = tm.load([spec.task])
        except Exception as e:  # noqa: BLE001
            if _is_missing_dataset(e):
                path, name = _dataset_of(tm, spec.task, e)
                missing.append((spec.task, path, name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                continue
            raise
        if spec.num_fewshot is not None:
            for t in loaded["tasks"].values():
                t.set_config(key="num_fewshot", value=spec.num_fewshot)
        if spec.task in loaded["groups"]:
            objs.append(loaded["groups"][spec.task])
        else:
            objs.extend(loaded["tasks"].values())
    if unknown:
        raise KeyError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm_eval ls tasks` or use a preset (paper, local)")
    if missing:
        raise MissingDatasetError(missing)
    return objs


def check_packages(specs: list[TaskSpec]) -> None:
    import importlib.util

    need = {TASK_PACKAGES[s.task] for s in specs if s.task in TASK_PACKAGES}
    absent = sorted(p for p in need if importlib.util.find_spec(p) is None)
    if absent:
        tasks = [s.task for s in specs if TASK_PACKAGES.get(s.task) in absent]
        raise ModuleNotFoundError(
            f"tasks {', '.join(tasks)} need the Python package(s) {', '.join(absent)} for their metric "
            f"(pip install git+https://github.com/felipemaiapolo/tinyBenchmarks), or drop them from --tasks"
        )


def evaluate(lm, specs: list[TaskSpec], *, limit: int | float | None = None, offline: bool = True,
             bootstrap_iters: int = 0, log_samples: bool = False, include_path=None, random_seed: int = 0,
             objs: list | None = None) -> dict:
    """lm-eval's `simple_evaluate` on the specs (or on already loaded task objects `objs`)."""
    if offline:
        set_offline(True)
    check_packages(specs)
    from lm_eval import simple_evaluate

    tm = task_manager(include_path, [s.task for s in specs])
    objs = load_tasks(specs, tm) if objs is None else objs
    out = simple_evaluate(
        model=lm, tasks=objs, limit=limit, task_manager=tm, bootstrap_iters=bootstrap_iters,
        log_samples=log_samples, random_seed=random_seed, numpy_random_seed=random_seed,
        torch_random_seed=random_seed, fewshot_random_seed=random_seed,
    )
    return out


# ----------------------------------------------------------------------------- tables
def metric_value(results: dict, task: str, metric: str | None = None) -> tuple[str, float] | None:
    """(metric, value) of a task in lm-eval results; value in [0, 100] for accuracies."""
    res = results.get("results", {}).get(task)
    if res is None:
        return None
    keys = [k for k in res if "," in k and not k.split(",")[0].endswith("_stderr")]
    pick = None
    if metric:
        pick = next((k for k in keys if k.split(",")[0] == metric), None)
    if pick is None:
        for m in ("acc", "exact_match", "acc_norm", "bits_per_byte", "word_perplexity"):
            pick = next((k for k in keys if k.split(",")[0] == m), None)
            if pick:
                break
    if pick is None and keys:
        pick = keys[0]
    if pick is None:
        return None
    name, v = pick.split(",")[0], res[pick]
    if not isinstance(v, (int, float)):
        return None
    return name, float(v) * (100.0 if name not in LOWER_IS_BETTER else 1.0)


def results_table(results: dict, specs: list[TaskSpec]) -> str:
    rows = ["| Benchmark | task | shots | metric | value |", "|---|---|---:|---|---:|"]
    shots = results.get("n-shot", {})
    vals = []
    for s in specs:
        mv = metric_value(results, s.task, s.metric)
        if mv is None:
            rows.append(f"| {s.label} | {s.task} | {shots.get(s.task, s.num_fewshot)} | - | n/a |")
            continue
        name, v = mv
        if name not in LOWER_IS_BETTER:
            vals.append(v)
        rows.append(f"| {s.label} | {s.task} | {shots.get(s.task, s.num_fewshot)} | {name} | {v:.2f} |")
    if vals:
        rows.append(f"| *Mean* (accuracy-type metrics) |  |  |  | *{sum(vals) / len(vals):.2f}* |")
    return "\n".join(rows)


def compare_table(a: dict, b: dict, specs: list[TaskSpec], name_a: str = "A", name_b: str = "B") -> str:
    """The paper's table: Benchmark | A | B | Difference (B - A), and the mean row."""
    rows = [f"| Benchmark | {name_a} | {name_b} | Difference |", "|---|---:|---:|---:|"]
    va, vb = [], []
    for s in specs:
        ma, mb = metric_value(a, s.task, s.metric), metric_value(b, s.task, s.metric)
        if ma is None and mb is None:
            continue
        fa = f"{ma[1]:.2f}" if ma else "n/a"
        fb = f"{mb[1]:.2f}" if mb else "n/a"
        diff = f"{mb[1] - ma[1]:+.2f}" if ma and mb else "n/a"
        metric = (ma or mb)[0]
        label = s.label + (f" ({metric}, lower is better)" if metric in LOWER_IS_BETTER else "")
        rows.append(f"| {label} | {fa} | {fb} | {diff} |")
        if ma and mb and metric not in LOWER_IS_BETTER:
            va.append(ma[1])
            vb.append(mb[1])
    if va:
        ma_, mb_ = sum(va) / len(va), sum(vb) / len(vb)
        rows.append(f"| *Mean* | *{ma_:.2f}* | *{mb_:.2f}* | *{mb_ - ma_:+.2f}* |")
    return "\n".join(rows)


def jsonable(results: dict) -> dict:
    """The JSON-serializable part of simple_evaluate's output (what lm_eval writes)."""
    from lm_eval.utils import handle_non_serializable

    keep = {k: v for k, v in results.items() if k != "samples"}
    return json.loads(json.dumps(keep, default=handle_non_serializable))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)

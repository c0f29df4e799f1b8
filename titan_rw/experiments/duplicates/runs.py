"""The run set: which (granularity, strategy) runs each seed gets, the checks of the settings, and
running them (in this process or in spawned workers), saving each run's raw arrays."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from titan_rw.experiments.duplicates.config import GRANULARITIES, DupConfig
from titan_rw.experiments.duplicates.data import build_dataset, duplicate_ids
from titan_rw.experiments.duplicates.statistics import summarize
from titan_rw.experiments.duplicates.tables import _f
from titan_rw.experiments.duplicates.training import train_one, validation_batches
from titan_rw.reweight import STRATEGIES


def run_plan(cfg: DupConfig, first_seed: bool) -> list[tuple[str, str]]:
    """(granularity, strategy) of one seed's runs. Uniform is the token mean at both granularities,
    so it runs once, at the first one (plus at document granularity on the first seed when
    `check_uniform_document`)."""
    grans = cfg.granularities()
    plan = []
    for s in cfg.strategies:
        if s == "uniform":
            plan.append((grans[0], s))
            if first_seed and cfg.check_uniform_document and grans[0] != "document":
                plan.append(("document", s))
        else:
            plan += [(g, s) for g in grans]
    return plan


def _check(cfg: DupConfig) -> None:
    for s in cfg.strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r} (--strategies); valid: {', '.join(STRATEGIES)}")
    if not cfg.strategies:
        raise ValueError("no strategy given (--strategies)")
    if cfg.granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {cfg.granularity!r} (--granularity); valid: {', '.join(GRANULARITIES)}")
    if not 0 <= cfg.dup_fraction < 1 or cfg.copies < 1:
        raise ValueError("need 0 <= dup_fraction < 1 (--dup-fraction) and copies >= 1 (--copies)")
    seeds = cfg.seed_list()
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds} (--seeds: a count N for 0..N-1, or a list like 0,1,2)")
    if cfg.min_document_tokens < 0 or cfg.max_documents_per_row < 1:
        raise ValueError("need --min-document-tokens >= 0 and --max-documents-per-row >= 1")
    if cfg.jobs < 1:
        raise ValueError("need --jobs >= 1")
    from titan_rw.models import FLAVORS

    if cfg.flavor not in FLAVORS:
        raise ValueError(f"unknown model flavor {cfg.flavor!r} (--flavor); valid: {', '.join(FLAVORS)}")


def _task(cfg: DupConfig, granularity: str, strategy: str, path: str, dup: list[str]) -> dict:
    """One run in a worker process (spawned: its own torch, `cfg.threads` threads)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    val = validation_batches(cfg) if cfg.eval_every > 0 else []
    return train_one(strategy, cfg, path, set(dup), val, log=lambda m: print(m, flush=True), granularity=granularity)


def run(cfg: DupConfig, out_dir: str, *, log=print) -> tuple[list[dict], list[dict]]:
    """All seeds' runs. Returns (per seed {seed, data, runs: [summary]}, the first seed's raw runs)."""
    _check(cfg)
    seeds = cfg.seed_list()
    tasks, per_seed = [], []
    for i, seed in enumerate(seeds):
        cs = replace(cfg, seed=seed)
        path, info = build_dataset(cs, os.path.join(out_dir, f"seed{seed}"))
        dup = duplicate_ids(path)
        log(
            f"seed {seed}: {info['pieces_used']} documents, {info['duplicated_pieces']} of them repeated "
            f"{cfg.copies}× -> {info['documents_written']} written, {info['duplicate_char_share']:.0%} of the text "
            f"duplicated ({path})"
        )
        per_seed.append({"seed": seed, "data": info, "runs": []})
        tasks += [(i, cs, g, s, path, sorted(dup)) for g, s in run_plan(cfg, i == 0)]
    log(f"{len(tasks)} runs ({len(seeds)} seeds), {cfg.jobs} at a time")
    results = [None] * len(tasks)
    if cfg.jobs == 1:
        val = validation_batches(cfg) if cfg.eval_every > 0 else []
        for k, (_, cs, g, s, path, dup) in enumerate(tasks):
            results[k] = train_one(s, cs, path, set(dup), val, log=log, granularity=g)
            _log_done(results[k], summarize(results[k]), log)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_task, cs, g, s, path, dup): k for k, (_, cs, g, s, path, dup) in enumerate(tasks)}
            for fut in as_completed(futs):
                k = futs[fut]
                results[k] = fut.result()
                _log_done(results[k], summarize(results[k]), log)
    first_raw = []
    for (i, *_), r in zip(tasks, results):
        per_seed[i]["runs"].append(summarize(r))
        raw = {k: v for k, v in r.items() if isinstance(v, np.ndarray)}  # to recompute other statistics
        np.savez_compressed(
            os.path.join(out_dir, f"seed{r['seed']}", f"{r['strategy']}_{r['granularity']}.npz"), **raw
        )
        if i == 0:
            first_raw.append(r)
    return per_seed, first_raw


def _log_done(r: dict, s: dict, log) -> None:
    w = s["weight"]
    log(
        f"{s['run']} (seed {s['seed']}): {len(s['train_token_mean_loss'])} steps in {r['seconds']:.1f} s; "
        f"val loss {_f(s['val_loss'])}; mean weight dup {w['dup']:.3f} unique {w['unique']:.3f}"
    )

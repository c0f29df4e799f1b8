"""Per-run and over-seed statistics: weight and loss of duplicated vs unique samples, validation loss,
the paired difference against the same seed's uniform run, uniform at row vs document granularity."""

from __future__ import annotations

import numpy as np


def _split_means(x: np.ndarray, q: np.ndarray, n: np.ndarray | None = None) -> dict:
    """Duplicated vs unique means of x: token weighted by n·q vs n·(1-q), and plain over pure
    samples (q = 1 vs q = 0). NaN entries (empty slots) are left out."""
    n = np.ones_like(x) if n is None else n
    ok = np.isfinite(q) & np.isfinite(x) & (n > 0)
    x, q, n = x[ok], q[ok], n[ok]
    sd, su = (n * q).sum(), (n * (1 - q)).sum()
    pure_d, pure_u = q >= 1.0 - 1e-9, q <= 1e-9
    return {
        "dup": float((n * q * x).sum() / sd) if sd > 0 else float("nan"),
        "unique": float((n * (1 - q) * x).sum() / su) if su > 0 else float("nan"),
        "dup_pure": float(x[pure_d].mean()) if pure_d.any() else float("nan"),
        "unique_pure": float(x[pure_u].mean()) if pure_u.any() else float("nan"),
        "samples_pure_dup": int(pure_d.sum()),
        "samples_pure_unique": int(pure_u.sum()),
        "samples": int(ok.sum()),
    }


def run_name(granularity: str, strategy: str) -> str:
    """"linupper / document"; uniform at row granularity (= the token mean) is plain "uniform"."""
    return "uniform" if (strategy, granularity) == ("uniform", "row") else f"{strategy} / {granularity}"


def summarize(run: dict) -> dict:
    q, n = run["share"], run["n_tokens"]
    half = q.shape[0] // 2
    nonempty = (n > 0).sum(axis=1)
    return {
        "run": run_name(run["granularity"], run["strategy"]),
        "strategy": run["strategy"],
        "granularity": run["granularity"],
        "seed": run["seed"],
        "weight": _split_means(run["bw"], q, n),
        "weight_second_half": _split_means(run["bw"][half:], q[half:], n[half:]),
        "loss": _split_means(run["losses"], q, n),
        "loss_second_half": _split_means(run["losses"][half:], q[half:], n[half:]),
        "val_loss": run["val_curve"][-1][1] if run["val_curve"] else None,
        "val_curve": run["val_curve"],
        "train_token_mean_loss": run["token_mean_loss"].tolist(),
        "mean_dup_share": float(np.nansum(q * n) / n.sum()),
        "samples_per_step": float(nonempty.mean()),
        "overflow_rows": run["overflow_rows"],
        "fragment_mismatch": run["fragment_mismatch"],
        "seconds": run["seconds"],
    }


def _mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else float("nan"))


def aggregate(per_seed: list[dict]) -> list[dict]:
    """Per run (granularity, strategy): the per-seed numbers and mean ± sample std over seeds; the
    paired difference of the validation loss against the same seed's uniform run."""
    order, by = [], {}
    for ps in per_seed:
        for s in ps["runs"]:
            key = (s["granularity"], s["strategy"])
            if key not in by:
                order.append(key)
                by[key] = []
            by[key].append((ps["seed"], s))
    ref = {}  # seed -> uniform validation loss (its first granularity)
    for ps in per_seed:
        for s in ps["runs"]:
            if s["strategy"] == "uniform" and ps["seed"] not in ref:
                ref[ps["seed"]] = s["val_loss"]
    out = []
    for key in order:
        rows = by[key]
        seeds = [seed for seed, _ in rows]
        val = [s["val_loss"] for _, s in rows]
        wd = [s["weight"]["dup"] for _, s in rows]
        wu = [s["weight"]["unique"] for _, s in rows]
        ratio = [d / u for d, u in zip(wd, wu)]
        entry = {
            "run": run_name(*key), "granularity": key[0], "strategy": key[1], "seeds": seeds,
            "val_loss": val, "weight_dup": wd, "weight_unique": wu, "weight_ratio": ratio,
        }
        for k in ("val_loss", "weight_dup", "weight_unique", "weight_ratio"):
            entry[k + "_mean"], entry[k + "_std"] = _mean_std(entry[k]) if None not in entry[k] else (None, None)
        if key[1] != "uniform" and all(ref.get(seed) is not None for seed in seeds) and None not in val:
            diff = [v - ref[seed] for seed, v in zip(seeds, val)]
            entry["diff_vs_uniform"] = diff
            entry["diff_mean"], entry["diff_std"] = _mean_std(diff)
            entry["seeds_better"] = int(sum(d < 0 for d in diff))
        out.append(entry)
    return out


def uniform_check(per_seed: list[dict]) -> dict | None:
    """Uniform at row vs document granularity on the same seed (when both ran): the differences."""
    for ps in per_seed:
        u = {s["granularity"]: s for s in ps["runs"] if s["strategy"] == "uniform"}
        if "row" in u and "document" in u:
            a, b = np.array(u["row"]["train_token_mean_loss"]), np.array(u["document"]["train_token_mean_loss"])
            return {
                "seed": ps["seed"],
                "val_loss_row": u["row"]["val_loss"],
                "val_loss_document": u["document"]["val_loss"],
                "first_step_train_loss_abs_diff": float(abs(a[0] - b[0])),
                "max_train_loss_abs_diff": float(np.abs(a - b).max()),
                "first_step_train_loss_differs": int(np.argmax(np.abs(a - b) > 1e-6)) + 1
                if (np.abs(a - b) > 1e-6).any() else None,
            }
    return None

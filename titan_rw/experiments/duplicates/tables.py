"""The printed tables and the figure of the first seed's runs."""

from __future__ import annotations

import math
import os

import numpy as np

from titan_rw.experiments.duplicates.config import DupConfig
from titan_rw.experiments.duplicates.statistics import aggregate, run_name


def _f(v, fmt=".4f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def format_table(summaries: list[dict], cfg: DupConfig) -> str:
    """One seed: a line per run."""
    lines = [
        f"| run | validation loss (step {cfg.steps}) | train loss dup / unique | "
        f"mean weight dup / unique (token weighted) | ratio | plain mean dup / unique (pure samples) | "
        f"token weighted, 2nd half |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        w, w2, lo = s["weight"], s["weight_second_half"], s["loss"]
        lines.append(
            f"| {s['run']} | {_f(s['val_loss'])} | {lo['dup']:.3f} / {lo['unique']:.3f} | "
            f"{w['dup']:.3f} / {w['unique']:.3f} | {w['dup'] / w['unique']:.3f} | "
            f"{w['dup_pure']:.3f} / {w['unique_pure']:.3f} | {w2['dup']:.3f} / {w2['unique']:.3f} |"
        )
    return "\n".join(lines)


def format_seed_table(per_seed: list[dict], cfg: DupConfig) -> str:
    """A line per (seed, run), with the paired difference to the seed's uniform run."""
    agg = {(a["granularity"], a["strategy"]): a for a in aggregate(per_seed)}
    lines = [
        f"| seed | run | validation loss (step {cfg.steps}) | Δ vs uniform | weight dup / unique (token weighted) "
        f"| plain mean dup / unique | train loss dup / unique |",
        "|---|---|---|---|---|---|---|",
    ]
    for ps in per_seed:
        for s in ps["runs"]:
            a = agg[(s["granularity"], s["strategy"])]
            diff = a.get("diff_vs_uniform")
            d = "—" if diff is None else f"{diff[a['seeds'].index(ps['seed'])]:+.4f}"
            w, lo = s["weight"], s["loss"]
            lines.append(
                f"| {ps['seed']} | {s['run']} | {_f(s['val_loss'])} | {d} | {w['dup']:.3f} / {w['unique']:.3f} | "
                f"{w['dup_pure']:.3f} / {w['unique_pure']:.3f} | {lo['dup']:.3f} / {lo['unique']:.3f} |"
            )
    return "\n".join(lines)


def format_summary_table(agg: list[dict]) -> str:
    """Mean ± sample std over seeds."""
    lines = [
        "| run | seeds | validation loss | Δ vs uniform (paired) | seeds below uniform | weight dup | weight unique "
        "| ratio dup / unique |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in agg:
        n = len(a["seeds"])
        d = "—" if "diff_mean" not in a else f"{a['diff_mean']:+.4f} ± {_f(a['diff_std'])}"
        better = "—" if "seeds_better" not in a else f"{a['seeds_better']}/{n}"
        lines.append(
            f"| {a['run']} | {n} | {_f(a['val_loss_mean'])} ± {_f(a['val_loss_std'])} | {d} | {better} | "
            f"{_f(a['weight_dup_mean'], '.3f')} ± {_f(a['weight_dup_std'], '.3f')} | "
            f"{_f(a['weight_unique_mean'], '.3f')} ± {_f(a['weight_unique_std'], '.3f')} | "
            f"{_f(a['weight_ratio_mean'], '.3f')} ± {_f(a['weight_ratio_std'], '.3f')} |"
        )
    return "\n".join(lines)


def _windowed(x: np.ndarray, q: np.ndarray, n: np.ndarray, window: int, dup: bool) -> tuple[np.ndarray, np.ndarray]:
    steps, vals = [], []
    for s in range(0, x.shape[0], window):
        xs, qs, ns = x[s : s + window], q[s : s + window], n[s : s + window]
        ok = np.isfinite(qs) & np.isfinite(xs) & (ns > 0)
        m = ((qs if dup else 1 - qs) * ns)[ok]
        if m.sum() > 0:
            steps.append(min(s + window, x.shape[0]) - (min(window, x.shape[0] - s) - 1) / 2)
            vals.append(float((m * xs[ok]).sum() / m.sum()))
    return np.array(steps), np.array(vals)


COLORS = {("uniform", "row"): "tab:gray", ("uniform", "document"): "0.35", ("linupper", "row"): "tab:blue",
          ("linupper", "document"): "tab:orange", ("quadratic", "row"): "tab:green", ("extremes", "row"): "tab:red",
          ("dro_kl", "row"): "tab:purple"}


def plot(runs: list[dict], summaries: list[dict], cfg: DupConfig, path: str) -> str:
    """The first seed's runs: validation loss, training loss and weight of duplicated vs unique."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9), dpi=110)
    color = {(r["strategy"], r["granularity"]): COLORS.get((r["strategy"], r["granularity"])) for r in runs}
    ax = axes[0]
    for s in summaries:
        if s["val_curve"]:
            xs, ys = zip(*s["val_curve"])
            ax.plot(xs, ys, marker="o", ms=3, label=s["run"], color=color.get((s["strategy"], s["granularity"])))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (held-out split)")
    ax.set_title("validation loss", fontsize=10)
    ax.legend()
    for ax, key, title, ylabel in (
        (axes[1], "losses", "training loss of duplicated vs unique samples", "per-sample training loss"),
        (axes[2], "bw", "weight relative to uniform", "mean w / prior (token weighted)"),
    ):
        for r in runs:
            if key == "bw" and r["strategy"] == "uniform":
                continue
            c = color.get((r["strategy"], r["granularity"]))
            for dup, ls in ((True, "-"), (False, "--")):
                xs, ys = _windowed(r[key], r["share"], r["n_tokens"], cfg.window, dup)
                ax.plot(xs, ys, ls=ls, color=c,
                        label=f"{run_name(r['granularity'], r['strategy'])}: {'duplicated' if dup else 'unique'}")
        if key == "bw":
            ax.axhline(1.0, color="0.5", lw=0.8, ls=":", label="uniform (= 1)")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.25)
    warm = f" (r = {cfg.warmup_temperature:g} for {cfg.temp_warmup_steps} steps)" if cfg.temp_warmup_steps else ""
    fig.suptitle(
        f"{cfg.dup_fraction:.0%} of documents repeated {cfg.copies}×; llama {cfg.flavor}, seq {cfg.seq_len}, "
        f"b = {cfg.batch_size}, {cfg.steps} steps, r = {cfg.temperature:g}{warm}; seed {runs[0]['seed']}",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

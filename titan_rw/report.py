"""`titan-rw report RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG figures and a summary of runs.

Reads each run's `metrics.jsonl` (see `titan_rw.observability`) and writes, with matplotlib's Agg
backend, into `--out` (default: `<first RUN_DIR>/report/`):

  fig6_max_weight.png      the paper's Figure 6: histogram of the max weight per step, 2/b line
  max_weight_steps.png     max weight per step and 2/b over the steps
  loss.png                 unweighted (solid) and weighted (dashed) loss of every run, overlaid
  domain_weight.png        mean b·w per domain over the steps (when the run logged provenance)
  summary.md               steps, final loss, max of max_weight, the bound, violations, per run
                           (numbers rounded to 4-5 significant digits)

Each PNG is written at 300 dpi, with a vector PDF of the same figure beside it. Figure 6 leaves out
the temperature warm-up steps (`[reweight] warmup_steps` of the run's run_config.toml) and says so.

With several runs the per-run figures get one panel per run (Figure 6, max weight) or one line per
run (loss); the label of a run is its `strategy` field when present, else its folder name.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections import Counter

from titan_rw.observability.jsonl import finite, read_metrics, read_samples


class Run:
    def __init__(self, path: str):
        self.path = path
        self.rows = read_metrics(path)
        name = os.path.basename(os.path.normpath(path)) or path
        strategy = self.rows[-1].get("strategy")
        self.label = f"{name} ({strategy})" if strategy and strategy not in name else name

    def col(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if finite(v):
                xs.append(r["step"])
                ys.append(float(v))
        return xs, ys

    def bound(self) -> float | None:
        """The most common 2/b of the run (b is constant unless samples were invalid)."""
        _, bs = self.col("max_weight_bound")
        if not bs:
            return None
        return Counter(round(x, 12) for x in bs).most_common(1)[0][0]

    def summary(self) -> dict:
        _, mw = self.col("max_weight")
        _, loss = self.col("loss")
        _, wl = self.col("weighted_loss")
        _, ratio = self.col("bound_ratio")
        viol = [r.get("bound_violations") for r in self.rows]
        if all(v is None for v in viol):  # an older metrics.jsonl without the count: recompute
            viol = [int(finite(r.get("bound_ratio")) and r["bound_ratio"] > 1 + 1e-6) for r in self.rows]
        return {
            "run": self.label,
            "path": self.path,
            "steps": len(self.rows),
            "first_step": self.rows[0]["step"],
            "last_step": self.rows[-1]["step"],
            "final_loss": loss[-1] if loss else float("nan"),
            "final_weighted_loss": wl[-1] if wl else float("nan"),
            "max_max_weight": max(mw) if mw else float("nan"),
            "mean_max_weight": sum(mw) / len(mw) if mw else float("nan"),
            "bound": self.bound(),
            "max_bound_ratio": max(ratio) if ratio else float("nan"),
            "violations": int(sum(v or 0 for v in viol)),
            "b": self.rows[-1].get("b"),
        }


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


DPI = 300  # publication resolution for the PNGs; each figure is also written as a vector PDF
TITLE_CHARS = 60  # characters per title line of a 5.5-inch panel at font size 10


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.savefig(os.path.splitext(path)[0] + ".pdf")
    _plt().close(fig)
    return path


def warmup_steps(run_path: str) -> int:
    """`[reweight] warmup_steps` of the run's saved config (0 when none was saved)."""
    import tomllib

    f = os.path.join(run_path, "run_config.toml")
    if not os.path.isfile(f):
        return 0
    try:
        with open(f, "rb") as fh:
            return int(tomllib.load(fh).get("reweight", {}).get("warmup_steps", 0) or 0)
    except (tomllib.TOMLDecodeError, ValueError, TypeError):
        return 0


def fig6(runs: list[Run], path: str) -> str:
    """Figure 6 of the paper: distribution of the max weight per step against 2/b."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        steps, mw = run.col("max_weight")
        warm = warmup_steps(run.path)  # the warm-up temperature's steps are not the strategy's
        if warm and any(s > warm for s in steps):
            mw = [w for s, w in zip(steps, mw) if s > warm]
        else:
            warm = 0
        bound = run.bound()
        _, bs = run.col("b")
        lo = min(mw + ([1.0 / max(bs)] if bs else []))  # 1/b: no max weight can be below it
        hi = max(mw + ([bound] if bound else []))
        pad = 0.05 * (hi - lo) or 0.05 * hi
        edges = [lo - pad + i * (hi - lo + 2 * pad) / 60 for i in range(61)]
        ax.hist(mw, bins=edges, color="#4C72B0", edgecolor="white", linewidth=0.5, label="max weight per step")
        ax.set_xlim(edges[0], edges[-1])
        if bound:
            ax.axvline(bound, color="#C44E52", linestyle="--", linewidth=2, label=f"2/b = {bound:.4g}")
        ax.set_xlabel("maximum weight in the step")
        ax.set_ylabel("steps")
        # the run's name on its own line(s), wrapped to the panel: a one-line title ran off the figure
        what = f"max weight per step ({len(mw)} steps" + (f", warm-up steps 1-{warm} excluded)" if warm else ")")
        ax.set_title("\n".join([*textwrap.wrap(run.label + ":", TITLE_CHARS), what]), fontsize=10)
        ax.legend(fontsize=8)
    return _save(fig, path)


def max_weight_steps(runs: list[Run], path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rx, ratio = run.col("max_weight_ratio")
        if ratio:  # granularity = "document": max_d w_d/π_d against its bound 2 (1 = uniform)
            ax.plot(rx, ratio, color="#4C72B0", linewidth=1, label="max w/π (document)")
            ax.axhline(2.0, color="#C44E52", linestyle="--", linewidth=1.5, label="bound 2")
            ax.axhline(1.0, color="gray", linestyle=":", linewidth=1, label="1 (uniform)")
            ax.set_xlabel("step")
            ax.set_ylabel("max weight / token share")
            ax.set_title(textwrap.fill(run.label, TITLE_CHARS), fontsize=10)
            ax.legend(fontsize=8)
            continue
        xs, mw = run.col("max_weight")
        bx, bs = run.col("max_weight_bound")
        ax.plot(xs, mw, color="#4C72B0", linewidth=1, label="max weight")
        if bs:
            ax.plot(bx, bs, color="#C44E52", linestyle="--", linewidth=1.5, label="2/b")
        ux, us = run.col("b")
        if us:
            ax.plot(ux, [1.0 / b for b in us], color="gray", linestyle=":", linewidth=1, label="1/b (uniform)")
        ax.set_xlabel("step")
        ax.set_ylabel("weight")
        ax.set_title(textwrap.fill(run.label, TITLE_CHARS), fontsize=10)
        ax.legend(fontsize=8)
    return _save(fig, path)


def loss_curves(runs: list[Run], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        xs, ys = run.col("loss")
        ax.plot(xs, ys, color=c, linewidth=1.3, label=f"{run.label} loss")
        wx, wy = run.col("weighted_loss")
        if wy:
            ax.plot(wx, wy, color=c, linewidth=1, linestyle="--", alpha=0.7, label=f"{run.label} weighted")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training loss: unweighted mean (solid), Σ w·f (dashed)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def domain_weights(runs: list[Run], path: str) -> str | None:
    with_domains = [r for r in runs if any(row.get("domains") for row in r.rows)]
    if not with_domains:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(with_domains), figsize=(5.5 * len(with_domains), 4), squeeze=False)
    for ax, run in zip(axes[0], with_domains):
        names = sorted({d for row in run.rows for d in (row.get("domains") or {})})
        for name in names:
            xs, ys = [], []
            for row in run.rows:
                v = (row.get("domains") or {}).get(name, {}).get("mean_weight")
                if finite(v):
                    xs.append(row["step"])
                    ys.append(v)
            ax.plot(xs, _smooth(ys), linewidth=1.2, label=name)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("mean b·w of the domain's samples (1 = uniform)")
        ax.set_title(textwrap.fill(f"{run.label}: weight per domain", TITLE_CHARS), fontsize=10)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _smooth(ys: list[float], k: int = 0) -> list[float]:
    """Trailing moving average over ~2% of the points (per-step domain means are noisy)."""
    k = k or max(1, len(ys) // 50)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _fmt(x, spec=".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    if spec == "r":  # shortest exact text of the float: the summary's max equals metrics.jsonl's
        return repr(float(x))
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def summary_markdown(runs: list[Run], figures: list[str], out: str) -> str:
    lines = ["# titan_rw run report", ""]
    lines += [
        "| run | steps | last step | final loss | final weighted loss | max of max_weight | 2/b "
        "| max max·b/2 | violations |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.summary()
        lines.append(
            f"| {s['run']} | {s['steps']} | {s['last_step']} | {_fmt(s['final_loss'])} | "
            f"{_fmt(s['final_weighted_loss'])} | {_fmt(s['max_max_weight'], '.5g')} | {_fmt(s['bound'], '.5g')} | "
            f"{_fmt(s['max_bound_ratio'], '.4f')} | {s['violations']} |"
        )
    lines += ["", "max·b/2 ≤ 1 means Theorem 1's precondition max w ≤ 2/b holds at that step.", ""]
    for run in runs:
        samples = read_samples(run.path)
        if samples:
            last = samples[-1]
            lines += [f"## {run.label}: samples at step {last['step']}", ""]
            for which, title in (("top", "most"), ("bottom", "least")):
                lines.append(f"{title} weighted:")
                for x in last.get(which, []):
                    lines.append(
                        f"- b·w {x['weight_x_b']:.3f}, loss {x['loss']:.3f}, {x.get('domain')}, "
                        f"`{x.get('doc_id')}` {x.get('url') or ''}"
                    )
                lines.append("")
    lines += ["## figures", ""]
    for f in figures:
        rel = os.path.relpath(f, out)
        lines.append(f"![{rel}]({rel})")
    return "\n".join(lines) + "\n"


def make_report(run_dirs: list[str], out: str | None = None) -> dict:
    """Write the figures and summary.md; returns {"out", "figures", "summary", "runs": [summary...]}."""
    if not run_dirs:
        raise ValueError("no run folder given")
    runs = [Run(p) for p in run_dirs]
    out = out or os.path.join(run_dirs[0], "report")
    os.makedirs(out, exist_ok=True)
    figures = [
        fig6(runs, os.path.join(out, "fig6_max_weight.png")),
        max_weight_steps(runs, os.path.join(out, "max_weight_steps.png")),
        loss_curves(runs, os.path.join(out, "loss.png")),
    ]
    dom = domain_weights(runs, os.path.join(out, "domain_weight.png"))
    if dom:
        figures.append(dom)
    summary = os.path.join(out, "summary.md")
    with open(summary, "w") as fh:
        fh.write(summary_markdown(runs, figures, out))
    return {"out": out, "figures": figures, "summary": summary, "runs": [r.summary() for r in runs]}


def report_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="titan-rw report",
        description="Figures (the paper's Figure 6, max weight vs 2/b, losses, per-domain weight) "
        "and a summary of one or more runs' metrics.jsonl.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) with metrics.jsonl (dump_folder)")
    p.add_argument("--out", default=None, help="output folder (default: <first RUN_DIR>/report)")
    a = p.parse_args(argv)
    try:
        res = make_report(a.run_dirs, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"titan-rw report: {e}", file=sys.stderr)
        return 2
    for s in res["runs"]:
        print(
            f"{s['run']}: {s['steps']} steps, final loss {_fmt(s['final_loss'])}, "
            f"max weight {_fmt(s['max_max_weight'], '.6g')} vs 2/b {_fmt(s['bound'], '.6g')}, "
            f"{s['violations']} violations"
        )
    print(f"wrote {len(res['figures'])} figures and {res['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(report_main())

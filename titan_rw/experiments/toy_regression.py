"""The paper's toy regression problem (Appendix B, Figure 7): reweighting strategies vs uniform.

Data (B.1): p = 64 features; n = 3200 clean samples x ~ N(0, I), y = x^T W* + b* + c eps;
m = 800 outliers with x = 0.1 N(0, 1) + 2 (per feature) and y ~ N(0, 1). W* ~ N(0, I) and
b* ~ N(0, 1) per seed (the paper leaves their law open). Per-sample loss (Eq. 11):
l_i = 1/2 (x_i^T W + b - y_i)^2. Test MSE: mean (x^T W + b - y)^2 on held-out clean data.

Training: minibatch SGD from W = 0, b = 0; each step draws the same minibatch for every strategy
(paired comparison), computes its per-sample losses, weights them with
`titan_rw.reweight.sample_weights` (Algorithm 1) and steps along sum_i w_i grad l_i. All seeds and
strategies run in one vectorized loop (the gradient of the linear model is written out, no autograd).

Run:  python -m titan_rw.experiments.toy_regression --out runs/toy_regression
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from titan_rw.reweight import STRATEGIES, sample_weights

DEFAULT_STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")
DIVERGED = 1e6  # a test MSE above this (or non-finite) is reported as diverged


@dataclass
class ToyConfig:
    p: int = 64
    n: int = 3200  # clean training samples
    m: int = 800  # outliers
    n_test: int = 2000  # clean held-out samples
    noise: float = 0.1  # c, the clean label noise scale
    steps: int = 1000
    batch_size: int = 32
    lr: float = 0.01
    temperature: float = 1.0  # r; the paper's Figure 7 (right) uses r = 1
    cap: float | None = None  # optional Prop. 1 cap (c / b); None = the paper's plain Eq. (4)
    seeds: int = 5
    early_steps: int = 200  # the "early" window for the AUC (mean test MSE over steps 1..early_steps)
    threshold: float = 2.0  # test MSE level for "steps to reach"
    strategies: tuple[str, ...] = field(default=DEFAULT_STRATEGIES)


@dataclass
class ToyResult:
    config: ToyConfig
    mse: torch.Tensor  # [K strategies, S seeds, steps + 1] test MSE, entry 0 = before training
    seconds: float


def make_data(seed: int, cfg: ToyConfig) -> dict[str, torch.Tensor]:
    """One seed's train/test sets (Appendix B.1). Features get a trailing 1 for the bias."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(cfg.p, generator=g)
    b_star = torch.randn((), generator=g)

    def clean(k):
        x = torch.randn(k, cfg.p, generator=g)
        y = x @ w_star + b_star + cfg.noise * torch.randn(k, generator=g)
        return x, y

    x_clean, y_clean = clean(cfg.n)
    x_ood = 0.1 * torch.randn(cfg.m, cfg.p, generator=g) + 2.0
    y_ood = torch.randn(cfg.m, generator=g)
    x_test, y_test = clean(cfg.n_test)
    ones = lambda k: torch.ones(k, 1)  # noqa: E731
    return {
        "x": torch.cat([torch.cat([x_clean, x_ood]), ones(cfg.n + cfg.m)], dim=1),
        "y": torch.cat([y_clean, y_ood]),
        "outlier": torch.cat([torch.zeros(cfg.n, dtype=torch.bool), torch.ones(cfg.m, dtype=torch.bool)]),
        "x_test": torch.cat([x_test, ones(cfg.n_test)], dim=1),
        "y_test": y_test,
    }


def _batch_indices(g: torch.Generator, seeds: int, n_total: int, steps: int, b: int) -> torch.Tensor:
    """[steps, seeds, b] minibatch indices: per seed, epochs of a fresh random permutation."""
    per_epoch = n_total // b
    epochs = math.ceil(steps / per_epoch)
    perms = torch.rand(epochs, seeds, n_total, generator=g).argsort(dim=-1)[..., : per_epoch * b]
    idx = perms.reshape(epochs, seeds, per_epoch, b).permute(0, 2, 1, 3).reshape(-1, seeds, b)
    return idx[:steps]


def run(cfg: ToyConfig) -> ToyResult:
    """Train every strategy on every seed; tiny ops, so one intra-op thread (much faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ToyConfig) -> ToyResult:
    for s in cfg.strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; valid: {', '.join(STRATEGIES)}")
    if cfg.batch_size > cfg.n + cfg.m:
        raise ValueError("batch size larger than the training set")
    t0 = time.perf_counter()
    data = [make_data(1000 + s, cfg) for s in range(cfg.seeds)]
    x = torch.stack([d["x"] for d in data])  # [S, N, p+1]
    y = torch.stack([d["y"] for d in data])  # [S, N]
    x_test = torch.stack([d["x_test"] for d in data])  # [S, T, p+1]
    y_test = torch.stack([d["y_test"] for d in data])  # [S, T]
    S, N, P = x.shape
    K = len(cfg.strategies)
    idx = _batch_indices(torch.Generator().manual_seed(7), S, N, cfg.steps, cfg.batch_size)
    seed_ix = torch.arange(S)[:, None]

    weigh = [
        torch.vmap(lambda f, s=s: sample_weights(f, s, cfg.temperature, cap=cfg.cap)) for s in cfg.strategies
    ]
    theta = torch.zeros(K, S, P)  # W and b, from zero
    mse = torch.empty(K, S, cfg.steps + 1)

    # Test MSE of the held-out set from its moments (exact, and O(P^2) instead of O(T P) per step):
    # mean_t (x_t.theta - y_t)^2 = theta' M theta - 2 theta' v + mean y^2, in float64.
    xt64, yt64 = x_test.double(), y_test.double()
    m_xx = xt64.transpose(1, 2) @ xt64 / xt64.shape[1]  # [S, P, P]
    v_xy = (xt64.transpose(1, 2) @ yt64[..., None]).squeeze(-1) / xt64.shape[1]  # [S, P]
    m_yy = (yt64 * yt64).mean(-1)  # [S]

    def test_mse():
        th = theta.double()
        quad = torch.einsum("ksp,spq,ksq->ks", th, m_xx, th)
        return (quad - 2.0 * (th * v_xy).sum(-1) + m_yy).float()

    mse[:, :, 0] = test_mse()
    with torch.no_grad():
        for t in range(cfg.steps):
            xb = x[seed_ix, idx[t]]  # [S, B, P]
            yb = y[seed_ix, idx[t]]  # [S, B]
            pred = torch.bmm(xb, theta.permute(1, 2, 0)).permute(2, 0, 1)  # [K, S, B]
            resid = pred - yb  # d loss_i / d pred_i
            losses = 0.5 * resid * resid  # Eq. (11)
            w = torch.stack([weigh[k](losses[k]) for k in range(K)])  # [K, S, B], sums to 1 per row
            grad = torch.bmm((w * resid).transpose(0, 1), xb).transpose(0, 1)  # sum_i w_i grad l_i
            theta -= cfg.lr * grad  # Alg. 1 line 8
            mse[:, :, t + 1] = test_mse()
    return ToyResult(cfg, mse, time.perf_counter() - t0)


def _first_step_below(curve: torch.Tensor, level: float) -> int | None:
    hit = (curve <= level).nonzero()
    return int(hit[0, 0]) if hit.numel() else None


def summarize(result: ToyResult) -> list[dict]:
    """Per strategy: AUC (mean test MSE over steps 1..early_steps), final MSE, steps to threshold.

    All on the seed-mean curve, plus per-seed AUCs and how many seeds beat uniform's AUC.
    """
    cfg, mse = result.config, result.mse
    early = min(cfg.early_steps, cfg.steps)
    auc_seed = mse[:, :, 1 : early + 1].mean(-1)  # [K, S]
    mean_curve = mse.mean(1)  # [K, steps + 1]
    u = cfg.strategies.index("uniform") if "uniform" in cfg.strategies else None
    rows = []
    for k, name in enumerate(cfg.strategies):
        rows.append(
            {
                "strategy": name,
                "auc": float(auc_seed[k].mean()),
                "auc_std": float(auc_seed[k].std()) if cfg.seeds > 1 else 0.0,
                "auc_per_seed": [float(v) for v in auc_seed[k]],
                "final": float(mean_curve[k, -1]),
                "steps_to_threshold": _first_step_below(mean_curve[k], cfg.threshold),
                "seeds_better_than_uniform": None
                if u is None
                else int((auc_seed[k] < auc_seed[u]).sum()),
            }
        )
    return rows


def format_table(rows: list[dict], cfg: ToyConfig) -> str:
    early = min(cfg.early_steps, cfg.steps)
    head = (
        f"| strategy | AUC: mean test MSE, steps 1-{early} (± std over seeds) | seeds with AUC < uniform "
        f"| final test MSE (step {cfg.steps}) | steps to MSE ≤ {cfg.threshold:g} |"
    )
    lines = [head, "|---|---|---|---|---|"]
    def num(v, fmt):
        return format(v, fmt) if math.isfinite(v) and v < DIVERGED else "diverged"

    for r in rows:
        reach = "never" if r["steps_to_threshold"] is None else str(r["steps_to_threshold"])
        better = "—" if r["strategy"] == "uniform" or r["seeds_better_than_uniform"] is None else (
            f"{r['seeds_better_than_uniform']}/{cfg.seeds}"
        )
        lines.append(
            f"| {r['strategy']} | {num(r['auc'], '.3f')} ± {num(r['auc_std'], '.3f')} | {better} "
            f"| {num(r['final'], '.4f')} | {reach} |"
        )
    return "\n".join(lines)


def plot(result: ToyResult, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    steps = torch.arange(cfg.steps + 1)
    mse = torch.nan_to_num(result.mse, nan=DIVERGED, posinf=DIVERGED).clamp(max=DIVERGED)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for k, name in enumerate(cfg.strategies):
        mean = mse[k].mean(0)
        (line,) = ax.plot(steps, mean, label=name, lw=1.6)
        if cfg.seeds > 1:
            ax.fill_between(steps, mse[k].min(0).values, mse[k].max(0).values, color=line.get_color(), alpha=0.08)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("test MSE (clean held-out data)")
    cap = "" if cfg.cap is None else f", cap {cfg.cap:g}/b"
    ax.set_title(
        f"Toy regression (paper App. B): r = {cfg.temperature:g}, b = {cfg.batch_size}, lr = {cfg.lr:g}{cap}\n"
        f"mean over {cfg.seeds} seeds (band: min-max)",
        fontsize=9,
    )
    ax.axvline(min(cfg.early_steps, cfg.steps), color="0.6", lw=0.8, ls=":")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="titan-rw experiment toy-regression",
        description="The paper's Appendix B toy regression: test MSE vs step for each reweighting strategy.",
    )
    d = ToyConfig()
    ap.add_argument("--seeds", type=int, default=d.seeds, help="number of seeds (default %(default)s)")
    ap.add_argument("--steps", type=int, default=d.steps, help="SGD steps (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size b (default %(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (default %(default)s)")
    ap.add_argument("--temperature", type=float, default=d.temperature, help="r in Eq. (4) (default %(default)s)")
    ap.add_argument("--cap", type=float, default=None, help="optional weight cap c: w <= c/b (default: none)")
    ap.add_argument("--outliers", type=int, default=d.m,
                    help=f"m, the outlier samples next to n = {d.n} clean ones (default %(default)s = 20 %% of all, "
                         "Appendix B.2; 1067 = 25 %% of all, the B.3 setting)")
    ap.add_argument(
        "--strategies",
        default=",".join(d.strategies),
        help=f"comma-separated, from {', '.join(STRATEGIES)} (default %(default)s)",
    )
    ap.add_argument("--early-steps", type=int, default=d.early_steps, help="AUC window (default %(default)s)")
    ap.add_argument("--threshold", type=float, default=d.threshold, help="MSE level for steps-to-reach")
    ap.add_argument("--out", default="runs/toy_regression", help="output folder for the PNG (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="small, fast run: 3 seeds, 300 steps")
    return ap.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> ToyConfig:
    strategies = tuple(s.strip() for s in a.strategies.split(",") if s.strip())
    if a.outliers < 0:
        raise ValueError(f"--outliers must be >= 0, got {a.outliers}")
    cfg = ToyConfig(
        seeds=a.seeds,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        temperature=a.temperature,
        cap=a.cap,
        m=a.outliers,
        strategies=strategies,
        early_steps=a.early_steps,
        threshold=a.threshold,
    )
    if a.quick:
        cfg.seeds, cfg.steps = min(cfg.seeds, 3), min(cfg.steps, 300)
    return cfg


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    try:
        cfg = config_from_args(a)
        result = run(cfg)
    except ValueError as e:
        print(f"toy-regression: {e}", file=sys.stderr)
        return 2
    rows = summarize(result)
    png = plot(result, os.path.join(a.out, "toy_regression.png"))
    print(
        f"toy regression (p={cfg.p}, n={cfg.n}, m={cfg.m} outliers): {cfg.seeds} seeds x {cfg.steps} steps, "
        f"b={cfg.batch_size}, lr={cfg.lr:g}, r={cfg.temperature:g}"
        + ("" if cfg.cap is None else f", cap={cfg.cap:g}")
        + f" — {result.seconds:.1f} s"
    )
    print(format_table(rows, cfg))
    print(f"figure: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

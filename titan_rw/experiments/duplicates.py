"""Duplicated documents: does LinUpper down-weight redundant, low-loss samples? (paper §4, Fig. 1)

Data. The embedded train split (`titan_rw/assets/corpus/train`), its documents cut into pieces of
at most `piece_chars` characters at line boundaries (so that a handful of long Wikipedia / Python
docs cannot dominate a random draw), optionally subsampled to `max_docs` pieces. A seeded random
`dup_fraction` of the pieces is repeated `copies` times in total; every document (originals and
copies) is then shuffled into a random order so that copies land in different rows, and written to
`<out>/data/train.parquet` (columns `text, id, domain, duplicate`; the copies' ids end in `#cNN`).
Validation: the embedded held-out split, untouched.

Training. One in-process loop per strategy, single process, built from the real pieces: the
`titan_rw.models` Llama flavor (TorchTitan's Llama3 with SDPA on CPU), `TokenDataLoader` over the
derived parquet (packed rows of seq_len + 1 tokens, the same seeded row order for every strategy),
`titan_rw.loss.per_sample_loss` (chunked per-sample NLL) and `titan_rw.loss.reweighted_loss`
(Algorithm 1 weights via `titan_rw.reweight`), AdamW with linear warm-up and cosine decay, gradient
clipping. Same initial weights and batches for every strategy: a paired comparison at equal steps.

A sample is a packed row, and a row may hold pieces of several documents. From the loader's
per-row provenance (`last_provenance`: doc ids and token counts) each row gets q = the share of its
tokens that come from duplicated documents. Reported per strategy:
- mean b·w of duplicated vs unique samples: token-share weighted, Σ q·bw / Σ q vs Σ (1-q)·bw /
  Σ (1-q) over all rows of all steps (b·w = 1 for every sample under uniform weighting), and the
  same over "pure" rows only (q = 1 vs q = 0);
- the same for the per-sample training loss;
- validation loss (token mean NLL) on the held-out split, every `eval_every` steps and at the end.

Run:  python -m titan_rw.experiments.duplicates --out runs/duplicates   (or `titan-rw experiment
duplicates`). Writes `results.json` and `duplicates.png` into --out and prints a table.
"""

from __future__ import annotations

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from titan_rw.reweight import STRATEGIES, TemperatureSchedule

DEFAULT_STRATEGIES = ("uniform", "linupper")


@dataclass
class DupConfig:
    flavor: str = "debug"
    seq_len: int = 256
    batch_size: int = 16  # b: the reweighting group (one micro-batch, one process)
    steps: int = 400
    lr: float = 1e-3
    warmup_steps: int = 20  # LR warm-up
    weight_decay: float = 0.01
    max_norm: float = 1.0
    temperature: float = 1.0  # r (paper: 1.0 for 1.4B)
    temp_warmup_steps: int = 0  # steps at temp_warmup_value before r (App. A.2 uses r = 100)
    temp_warmup_value: float = 100.0
    strategies: tuple[str, ...] = field(default=DEFAULT_STRATEGIES)
    dup_fraction: float = 0.05  # of the documents (pieces)
    copies: int = 20  # total occurrences of each duplicated document
    piece_chars: int = 2000
    max_docs: int | None = None  # subsample the pieces (tests); None = all
    seed: int = 0  # data selection, shuffles, row order and the model init
    eval_every: int = 100
    eval_batches: int = 24  # validation batches of batch_size rows (None/0 = the whole split)
    loss_chunks: int = 4
    window: int = 20  # steps per point of the training curves in the figure


# ----------------------------------------------------------------------------- data
def _split_text(text: str, limit: int) -> list[str]:
    """Cut at line boundaries into pieces of at most ~limit characters (a single longer line is
    cut hard). Concatenating the pieces gives the text back."""
    if len(text) <= limit:
        return [text]
    pieces, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(line[:limit])
            line = line[limit:]
        if len(cur) + len(line) > limit and cur:
            pieces.append(cur)
            cur = ""
        cur += line
    if cur:
        pieces.append(cur)
    return pieces


def build_dataset(cfg: DupConfig, out_dir: str, source_dir: str | None = None) -> tuple[str, dict]:
    """Write the derived train set; return (parquet path, description)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from titan_rw.data import EMBEDDED_TRAIN

    src = source_dir or EMBEDDED_TRAIN
    files = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))
    texts, ids, domains = [], [], []
    for f in files:
        t = pq.read_table(os.path.join(src, f), columns=["text", "id", "domain"]).to_pydict()
        for text, doc_id, dom in zip(t["text"], t["id"], t["domain"]):
            parts = [p for p in _split_text(text, cfg.piece_chars) if p.strip()]
            for k, p in enumerate(parts):
                texts.append(p)
                ids.append(doc_id if len(parts) == 1 else f"{doc_id}/p{k}")
                domains.append(dom)
    rng = np.random.default_rng([cfg.seed, 2025])
    n_all = len(texts)
    keep = np.arange(n_all)
    if cfg.max_docs and cfg.max_docs < n_all:
        keep = np.sort(rng.choice(n_all, size=cfg.max_docs, replace=False))
    n = len(keep)
    n_dup = max(1, int(round(cfg.dup_fraction * n))) if cfg.dup_fraction > 0 else 0
    dup_set = set(rng.choice(keep, size=n_dup, replace=False).tolist())

    rows = []  # (text, id, domain, duplicate)
    for i in keep.tolist():
        if i in dup_set:
            for c in range(cfg.copies):
                rows.append((texts[i], ids[i] if c == 0 else f"{ids[i]}#c{c:02d}", domains[i], True))
        else:
            rows.append((texts[i], ids[i], domains[i], False))
    order = rng.permutation(len(rows))
    rows = [rows[j] for j in order]
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "train.parquet")
    table = pa.table({
        "text": [r[0] for r in rows],
        "id": [r[1] for r in rows],
        "domain": [r[2] for r in rows],
        "duplicate": [r[3] for r in rows],
    })
    pq.write_table(table, path)
    chars_dup = sum(len(r[0]) for r in rows if r[3])
    chars_all = sum(len(r[0]) for r in rows)
    info = {
        "path": path,
        "source": src,
        "pieces_total": n_all,
        "pieces_used": n,
        "duplicated_pieces": n_dup,
        "copies": cfg.copies,
        "documents_written": len(rows),
        "duplicate_char_share": chars_dup / max(chars_all, 1),
    }
    return path, info


def duplicate_ids(path: str) -> set[str]:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["id", "duplicate"]).to_pydict()
    return {i for i, d in zip(t["id"], t["duplicate"]) if d}


def row_dup_share(provenance: list[list[dict]], dup: set[str]) -> np.ndarray:
    """Per row: share of its tokens from duplicated documents (NaN for an empty row)."""
    out = np.full(len(provenance), np.nan)
    for j, docs in enumerate(provenance):
        tot = sum(d["n_tokens"] for d in docs)
        if tot:
            out[j] = sum(d["n_tokens"] for d in docs if d["doc_id"] in dup) / tot
    return out


# ----------------------------------------------------------------------------- training
def _build_model(cfg: DupConfig):
    from titan_rw.models import model_config

    torch.manual_seed(cfg.seed)
    model = model_config(cfg.flavor).build()
    model.init_weights(buffer_device=None)
    model._skip_lm_head = True  # per_sample_loss applies the output projection itself
    return model


def _loader(cfg: DupConfig, **kw):
    from titan_rw.data.loader import TokenDataLoader

    return TokenDataLoader.Config(seed=cfg.seed, **kw).build(
        dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=cfg.seq_len, local_batch_size=cfg.batch_size
    )


def validation_batches(cfg: DupConfig) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    dl = _loader(cfg, dataset="embedded_validation", infinite=False, shuffle=False)
    out = []
    for input_dict, labels in dl:
        out.append((input_dict["input"], input_dict["positions"], labels))
        if cfg.eval_batches and len(out) >= cfg.eval_batches:
            break
    return out


@torch.no_grad()
def evaluate(model, batches, cfg: DupConfig) -> float:
    from titan_rw.loss import per_sample_loss

    model.eval()
    tot, n = 0.0, 0
    for inp, pos, lab in batches:
        f, nv = per_sample_loss(model.lm_head, model(inp, positions=pos), lab, num_chunks=cfg.loss_chunks)
        tot += float((f * nv).sum())
        n += int(nv.sum())
    model.train()
    return tot / max(n, 1)


def train_one(strategy: str, cfg: DupConfig, train_path: str, dup: set[str], val, log=None) -> dict:
    from titan_rw.loss import per_sample_loss, reweighted_loss

    model = _build_model(cfg)
    dl = _loader(cfg, dataset_path=train_path, format="parquet")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )

    def lr_factor(step):  # step counts from 0 here; warm-up then cosine to 10 %
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    temp = TemperatureSchedule(
        target=cfg.temperature, warmup_value=cfg.temp_warmup_value, warmup_steps=cfg.temp_warmup_steps
    )
    it = iter(dl)
    losses, bw, share = [], [], []
    val_curve = [(0, evaluate(model, val, cfg))] if val else []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        input_dict, labels = next(it)
        q = row_dup_share(dl.last_provenance, dup)
        hidden = model(input_dict["input"], positions=input_dict["positions"])
        f, n_valid = per_sample_loss(model.lm_head, hidden, labels, num_chunks=cfg.loss_chunks)
        loss, stats = reweighted_loss(
            f, torch.tensor(temp(step)), strategy=strategy, cap=None, group=None, dp_rank=0, dp_size=1,
            valid=n_valid > 0,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_norm)
        opt.step()
        sched.step()
        b = stats.valid.sum().clamp(min=1)
        losses.append(stats.losses.detach().numpy().copy())
        bw.append((stats.weights * b).detach().numpy().copy())
        share.append(q)
        if val and (step % cfg.eval_every == 0 or step == cfg.steps):
            val_curve.append((step, evaluate(model, val, cfg)))
        if log is not None and step % max(cfg.steps // 4, 1) == 0 and step < cfg.steps:
            log(f"  {strategy}: step {step}/{cfg.steps}, {time.perf_counter() - t0:.0f} s, loss {float(stats.mean_loss):.3f}")
    seconds = time.perf_counter() - t0
    return {
        "strategy": strategy,
        "losses": np.stack(losses),  # [steps, b]
        "bw": np.stack(bw),  # [steps, b]
        "share": np.stack(share),  # [steps, b] duplicated-token share q of each row
        "val_curve": val_curve,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- summary
def _split_means(x: np.ndarray, q: np.ndarray) -> dict:
    ok = np.isfinite(q) & np.isfinite(x)
    x, q = x[ok], q[ok]
    sd, su = q.sum(), (1 - q).sum()
    pure_d, pure_u = q >= 1.0 - 1e-9, q <= 1e-9
    return {
        "dup": float((q * x).sum() / sd) if sd > 0 else float("nan"),
        "unique": float(((1 - q) * x).sum() / su) if su > 0 else float("nan"),
        "dup_pure": float(x[pure_d].mean()) if pure_d.any() else float("nan"),
        "unique_pure": float(x[pure_u].mean()) if pure_u.any() else float("nan"),
        "rows_pure_dup": int(pure_d.sum()),
        "rows_pure_unique": int(pure_u.sum()),
        "rows": int(ok.sum()),
    }


def summarize(run: dict) -> dict:
    q = run["share"]
    half = q.shape[0] // 2
    out = {
        "strategy": run["strategy"],
        "weight": _split_means(run["bw"], q),
        "weight_second_half": _split_means(run["bw"][half:], q[half:]),
        "loss": _split_means(run["losses"], q),
        "loss_second_half": _split_means(run["losses"][half:], q[half:]),
        "val_loss": run["val_curve"][-1][1] if run["val_curve"] else None,
        "val_curve": run["val_curve"],
        "mean_dup_share": float(np.nanmean(q)),
        "seconds": run["seconds"],
    }
    return out


def format_table(summaries: list[dict], cfg: DupConfig) -> str:
    lines = [
        f"| strategy | validation loss (step {cfg.steps}) | train loss dup / unique | "
        f"mean b·w dup / unique (all steps) | ratio | mean b·w dup / unique (pure rows) | "
        f"mean b·w dup / unique (2nd half) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        w, wp, w2, lo = s["weight"], s["weight"], s["weight_second_half"], s["loss"]
        val = "—" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
        lines.append(
            f"| {s['strategy']} | {val} | {lo['dup']:.3f} / {lo['unique']:.3f} | "
            f"{w['dup']:.3f} / {w['unique']:.3f} | {w['dup'] / w['unique']:.3f} | "
            f"{wp['dup_pure']:.3f} / {wp['unique_pure']:.3f} | {w2['dup']:.3f} / {w2['unique']:.3f} |"
        )
    return "\n".join(lines)


def _windowed(x: np.ndarray, q: np.ndarray, window: int, dup: bool) -> tuple[np.ndarray, np.ndarray]:
    steps, vals = [], []
    for s in range(0, x.shape[0], window):
        xs, qs = x[s : s + window], q[s : s + window]
        ok = np.isfinite(qs)
        m = (qs if dup else 1 - qs)[ok]
        if m.sum() > 0:
            steps.append(min(s + window, x.shape[0]) - (min(window, x.shape[0] - s) - 1) / 2)
            vals.append(float((m * xs[ok]).sum() / m.sum()))
    return np.array(steps), np.array(vals)


def plot(runs: list[dict], summaries: list[dict], cfg: DupConfig, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9), dpi=110)
    colors = {"uniform": "tab:gray", "linupper": "tab:blue", "quadratic": "tab:green", "extremes": "tab:red",
              "dro_kl": "tab:purple"}
    ax = axes[0]
    for s in summaries:
        if s["val_curve"]:
            xs, ys = zip(*s["val_curve"])
            ax.plot(xs, ys, marker="o", ms=3, label=s["strategy"], color=colors.get(s["strategy"]))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (held-out split)")
    ax.set_title("validation loss", fontsize=10)
    ax.legend()
    ax = axes[1]
    for r in runs:
        c = colors.get(r["strategy"])
        for dup, ls in ((True, "-"), (False, "--")):
            xs, ys = _windowed(r["losses"], r["share"], cfg.window, dup)
            ax.plot(xs, ys, ls=ls, color=c, label=f"{r['strategy']}: {'duplicated' if dup else 'unique'}")
    ax.set_xlabel("step")
    ax.set_ylabel("per-sample training loss")
    ax.set_title("training loss of duplicated vs unique samples", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    for r in runs:
        if r["strategy"] == "uniform":
            continue
        c = colors.get(r["strategy"])
        for dup, ls in ((True, "-"), (False, "--")):
            xs, ys = _windowed(r["bw"], r["share"], cfg.window, dup)
            ax.plot(xs, ys, ls=ls, color=c, label=f"{r['strategy']}: {'duplicated' if dup else 'unique'}")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":", label="uniform (b·w = 1)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean b·w (token-share weighted)")
    ax.set_title("sample weight × b", fontsize=10)
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.25)
    fig.suptitle(
        f"{cfg.dup_fraction:.0%} of documents repeated {cfg.copies}×; llama {cfg.flavor}, seq {cfg.seq_len}, "
        f"b = {cfg.batch_size}, {cfg.steps} steps, r = {cfg.temperature:g}",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- entry point
def run(cfg: DupConfig, out_dir: str, *, log=print) -> tuple[list[dict], list[dict], dict]:
    for s in cfg.strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; valid: {', '.join(STRATEGIES)}")
    if not 0 <= cfg.dup_fraction < 1 or cfg.copies < 1:
        raise ValueError("need 0 <= dup_fraction < 1 and copies >= 1")
    from titan_rw.models import FLAVORS

    if cfg.flavor not in FLAVORS:
        raise ValueError(f"unknown model flavor {cfg.flavor!r}; valid: {', '.join(FLAVORS)}")
    path, info = build_dataset(cfg, out_dir)
    dup = duplicate_ids(path)
    log(
        f"data: {info['pieces_used']} documents, {info['duplicated_pieces']} of them repeated {cfg.copies}× "
        f"-> {info['documents_written']} written, {info['duplicate_char_share']:.0%} of the text duplicated ({path})"
    )
    val = validation_batches(cfg) if cfg.eval_every > 0 else []
    runs, summaries = [], []
    for s in cfg.strategies:
        r = train_one(s, cfg, path, dup, val, log=log)
        runs.append(r)
        summaries.append(summarize(r))
        w = summaries[-1]["weight"]
        log(
            f"{s}: {cfg.steps} steps in {r['seconds']:.1f} s; val loss "
            f"{summaries[-1]['val_loss'] if summaries[-1]['val_loss'] is not None else float('nan'):.4f}; "
            f"mean b·w dup {w['dup']:.3f} unique {w['unique']:.3f}"
        )
    return runs, summaries, info


def _parse(argv):
    d = DupConfig()
    ap = argparse.ArgumentParser(
        prog="titan-rw experiment duplicates",
        description="Duplicated documents in the embedded corpus: uniform vs LinUpper at equal steps "
        "(validation loss; mean weight of duplicated vs unique samples).",
    )
    ap.add_argument("--out", default="runs/duplicates", help="output folder (default %(default)s)")
    ap.add_argument("--flavor", default=d.flavor, help="model flavor: tiny, debug (default %(default)s)")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="b (default %(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--temperature", type=float, default=d.temperature, help="r (default %(default)s)")
    ap.add_argument("--temp-warmup-steps", type=int, default=d.temp_warmup_steps,
                    help="steps at r = 100 first (App. A.2; default %(default)s)")
    ap.add_argument("--strategies", default=",".join(d.strategies), help="comma-separated (default %(default)s)")
    ap.add_argument("--dup-fraction", type=float, default=d.dup_fraction, help="of documents (default %(default)s)")
    ap.add_argument("--copies", type=int, default=d.copies, help="occurrences of each duplicated document")
    ap.add_argument("--max-docs", type=int, default=None, help="subsample the documents (default: all)")
    ap.add_argument("--eval-every", type=int, default=d.eval_every, help="0: no validation")
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches, help="0: the whole held-out split")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 120 steps, 400 documents (~30 s)")
    return ap.parse_args(argv)


def config_from_args(a) -> DupConfig:
    cfg = DupConfig(
        flavor=a.flavor, steps=a.steps, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr,
        temperature=a.temperature, temp_warmup_steps=a.temp_warmup_steps,
        strategies=tuple(s.strip() for s in a.strategies.split(",") if s.strip()),
        dup_fraction=a.dup_fraction, copies=a.copies, max_docs=a.max_docs, eval_every=a.eval_every,
        eval_batches=a.eval_batches, seed=a.seed,
    )
    if a.quick:
        cfg.flavor, cfg.seq_len, cfg.steps, cfg.eval_every, cfg.eval_batches, cfg.window = "tiny", 64, 120, 60, 8, 10
        cfg.max_docs = cfg.max_docs or 400
        cfg.lr = 3e-3
    return cfg


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        cfg = config_from_args(a)
        os.makedirs(a.out, exist_ok=True)
        runs, summaries, info = run(cfg, a.out)
    except ValueError as e:
        print(f"duplicates: {e}", file=sys.stderr)
        return 2
    png = plot(runs, summaries, cfg, os.path.join(a.out, "duplicates.png"))
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "data": info,
        "results": summaries,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(
        f"\nduplicates: {info['duplicated_pieces']}/{info['pieces_used']} documents x{cfg.copies} "
        f"({info['duplicate_char_share']:.0%} of the training text), llama {cfg.flavor}, seq {cfg.seq_len}, "
        f"b={cfg.batch_size}, {cfg.steps} steps, r={cfg.temperature:g}"
    )
    print(format_table(summaries, cfg))
    print(f"results: {os.path.join(a.out, 'results.json')}\nfigure: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Duplicated documents: does LinUpper down-weight redundant, low-loss samples? (paper §3-4, Fig. 1)

Data. The embedded train split (`titan_rw/assets/corpus/train`), its documents cut into pieces of
at most `piece_chars` characters at line boundaries (so that a handful of long Wikipedia / Python
docs cannot dominate a random draw), optionally subsampled to `max_docs` pieces. A seeded random
`dup_fraction` of the pieces is repeated `copies` times in total; every document (originals and
copies) is then shuffled into a random order so that copies land in different rows, and written to
`<out>/seed<S>/data/train.parquet` (columns `text, id, domain, duplicate`; the copies' ids end in
`#cNN`). Validation: the embedded held-out split, untouched.

Training. One in-process loop per run, single process, built from the real pieces: the
`titan_rw.models` Llama flavor (TorchTitan's Llama3, document-causal SDPA on CPU), `TokenDataLoader`
over the derived parquet (packed rows of seq_len + 1 tokens), AdamW with linear warm-up and cosine
decay, gradient clipping. Within a seed every run starts from the same initial weights and sees the
same batches: a paired comparison at equal steps. The seed sets the subsample, the duplicated set,
the shuffles, the row order and the initial weights.

Granularity (what a "sample" of Algorithm 1 is).
- `row`: a packed row (it may hold pieces of several documents): `titan_rw.loss.per_sample_loss`
  and `reweighted_loss`, the b rows of a batch weighted together; prior 1/b.
- `document`: each document fragment inside a row (a run of `positions` restarting at 0):
  `titan_rw.loss.per_token_nll` reduced per fragment by `titan_rw.documents.document_losses`, all
  fragments of the batch weighted together by `document_weights` (prior pi_d = n_d / N, its token
  share); the loss is sum_d w_d f_d. Under `uniform`, w_d = pi_d: the token mean, which is the row
  mean for fully packed rows, so uniform runs once per seed (at the first granularity asked for) and
  is the reference of both; `check_uniform_document` also runs it at document granularity on the
  first seed and reports the difference.

Temperature. r (`temperature`), or the paper's warm-up (App. A.2: "We set r to 100 for a specific
number of warmup steps and then reduce it to 1"): `temp_warmup_steps` K > 0 uses
r = `warmup_temperature` (100) for steps 1..K, then r.

Reported per run, from each sample's weight relative to its uniform share, w / prior (b·w for rows,
w_d / pi_d for fragments; 1 under uniform), and its share q of tokens from duplicated documents
(per row from the loader's provenance; 0 or 1 per fragment, except a merged overflow fragment):
- weight of duplicated vs unique: token weighted, sum n q x / sum n q vs sum n (1-q) x /
  sum n (1-q) over all samples of all steps (for fragments: the weight mass duplicated tokens got
  over their token share), and the plain mean over "pure" samples (q = 1 vs q = 0); the same over
  the second half of training;
- the same for the per-sample training loss;
- validation loss (token mean NLL) on the held-out split, every `eval_every` steps and at the end.
Over seeds: mean ± sample std (ddof 1) of each, and the paired difference of the validation loss
against the same seed's uniform run (mean ± std of the differences, how many seeds are below).

Run:  python -m titan_rw.experiments.duplicates --out runs/duplicates   (or `titan-rw experiment
duplicates`). Writes `results.json` and `duplicates.png` (the first seed) into --out and prints
the tables.
"""

from __future__ import annotations

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from titan_rw.documents import DEFAULT_MAX_DOCUMENTS, DEFAULT_MIN_DOCUMENT_TOKENS
from titan_rw.reweight import STRATEGIES, TemperatureSchedule

DEFAULT_STRATEGIES = ("uniform", "linupper")
GRANULARITIES = ("row", "document", "both")


@dataclass
class DupConfig:
    flavor: str = "debug"
    seq_len: int = 256
    batch_size: int = 16  # b: rows per step, the reweighting group (one micro-batch, one process)
    steps: int = 400
    lr: float = 1e-3
    warmup_steps: int = 20  # LR warm-up
    weight_decay: float = 0.01
    max_norm: float = 1.0
    temperature: float = 1.0  # r (paper: 1.0 for 1.4B)
    temp_warmup_steps: int = 0  # steps at warmup_temperature before r (App. A.2: r = 100)
    warmup_temperature: float = 100.0
    strategies: tuple[str, ...] = field(default=DEFAULT_STRATEGIES)
    granularity: str = "row"  # row | document | both
    dup_fraction: float = 0.05  # of the documents (pieces)
    copies: int = 20  # total occurrences of each duplicated document
    piece_chars: int = 2000
    max_docs: int | None = None  # subsample the pieces; None = all
    seed: int = 0  # the seed of one run set (data selection, shuffles, row order, model init)
    seeds: tuple[int, ...] | None = None  # several run sets; None = (seed,)
    min_document_tokens: int = DEFAULT_MIN_DOCUMENT_TOKENS  # shorter fragments keep their token share
    max_documents_per_row: int = DEFAULT_MAX_DOCUMENTS  # fragment slots per row; more are merged into the last
    check_uniform_document: bool = False  # also run uniform at document granularity (first seed)
    jobs: int = 1  # runs at once (separate processes)
    threads: int | None = None  # torch intra-op threads per run process
    eval_every: int = 100
    eval_batches: int = 24  # validation batches of batch_size rows (None/0 = the whole split)
    loss_chunks: int = 4
    window: int = 20  # steps per point of the training curves in the figure

    def seed_list(self) -> tuple[int, ...]:
        return tuple(self.seeds) if self.seeds else (self.seed,)

    def granularities(self) -> tuple[str, ...]:
        return ("row", "document") if self.granularity == "both" else (self.granularity,)


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
        "duplicated_ids": sorted(ids[i] for i in dup_set),
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


def fragment_dup_share(provenance: list[list[dict]], dup: set[str], max_documents_per_row: int) -> np.ndarray:
    """[B, max_documents_per_row]: per document fragment of each row, the share of its tokens from
    duplicated documents (0 or 1; mixed only for the last slot of a row with more fragments, where
    the rest are merged like `document_losses` does); NaN for empty slots. Fragment k of a row is
    the row's k-th document in the provenance (row order)."""
    out = np.full((len(provenance), max_documents_per_row), np.nan)
    for j, docs in enumerate(provenance):
        for k in range(min(len(docs), max_documents_per_row)):
            part = docs[k:] if k == max_documents_per_row - 1 else docs[k : k + 1]
            tot = sum(d["n_tokens"] for d in part)
            if tot:
                out[j, k] = sum(d["n_tokens"] for d in part if d["doc_id"] in dup) / tot
    return out


# ----------------------------------------------------------------------------- training
def _build_model(cfg: DupConfig):
    from titan_rw.models import model_config

    torch.manual_seed(cfg.seed)
    model = model_config(cfg.flavor).build()
    model.init_weights(buffer_device=None)
    model._skip_lm_head = True  # the loss applies the output projection itself
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


def step_loss(model, inputs, positions, labels, *, granularity: str, strategy: str, temperature: float,
              cfg: DupConfig) -> tuple[torch.Tensor, dict]:
    """One batch: the weighted loss sum_i w_i f_i (Alg. 1 line 8) with autograd, and a detached
    record of its samples (numpy, flat): losses f, weights w, prior (uniform weight: 1/b per row,
    token share n_d / N per fragment), n_tokens; empty fragment slots have n_tokens 0 and prior 0."""
    from titan_rw.documents import document_losses
    from titan_rw.loss import ReweightSettings, per_sample_loss, per_token_nll, reweighted_loss

    settings = ReweightSettings(strategy, min_document_tokens=cfg.min_document_tokens)  # one process, no cap
    hidden = model(inputs, positions=positions)
    extra = {}
    if granularity == "row":
        f, n = per_sample_loss(model.lm_head, hidden, labels, num_chunks=cfg.loss_chunks)
        loss, st = reweighted_loss(f, torch.tensor(float(temperature)), settings, valid=n > 0)
        prior = st.valid.float() / st.b.clamp(min=1)
    elif granularity == "document":
        # Alg. 1 over the fragments of the batch, on top of their token shares (titan_rw.documents)
        nll = per_token_nll(model.lm_head, hidden, labels, num_chunks=cfg.loss_chunks)
        d = document_losses(nll, labels, positions, cfg.max_documents_per_row)
        f, n = d.losses.reshape(-1), d.n_tokens.reshape(-1)
        loss, st = reweighted_loss(f, torch.tensor(float(temperature)), settings, valid=n > 0, n_tokens=n,
                                   merged=d.merged.reshape(-1))
        prior = st.prior
        extra["overflow_rows"] = int((d.overflow > 0).sum())
    else:
        raise ValueError(f"unknown granularity {granularity!r}; valid: row, document")
    w = st.weights
    fd = f.detach().double()
    nd = n.double()
    rec = {
        "losses": fd.numpy(),
        "weights": w.detach().double().numpy(),
        "prior": prior.detach().double().numpy(),
        "n_tokens": nd.numpy(),
        "token_mean_loss": float((torch.where(nd > 0, fd, 0.0) * nd).sum() / nd.sum().clamp(min=1)),
        **extra,
    }
    return loss, rec


def train_one(strategy: str, cfg: DupConfig, train_path: str, dup: set[str], val, log=None,
              granularity: str = "row") -> dict:
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
        target=cfg.temperature, warmup_temperature=cfg.warmup_temperature, warmup_steps=cfg.temp_warmup_steps
    )
    it = iter(dl)
    rel, losses, share, tokens, token_mean = [], [], [], [], []
    overflow = mismatch = 0
    val_curve = [(0, evaluate(model, val, cfg))] if val else []
    name = f"{strategy} ({granularity}, seed {cfg.seed})"
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        input_dict, labels = next(it)
        prov = dl.last_provenance
        loss, rec = step_loss(
            model, input_dict["input"], input_dict["positions"], labels, granularity=granularity,
            strategy=strategy, temperature=temp(step), cfg=cfg,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_norm)
        opt.step()
        sched.step()
        if granularity == "row":
            q = row_dup_share(prov, dup)
        else:
            q2 = fragment_dup_share(prov, dup, cfg.max_documents_per_row)
            # the provenance's documents and the fragments found from the positions must agree
            mismatch += int((np.isfinite(q2.reshape(-1)) != (rec["n_tokens"] > 0)).sum())
            overflow += rec["overflow_rows"]
            q = q2.reshape(-1)
        prior = rec["prior"]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel.append(np.where(prior > 0, rec["weights"] / prior, np.nan))
        losses.append(np.where(rec["n_tokens"] > 0, rec["losses"], np.nan))
        share.append(q)
        tokens.append(rec["n_tokens"])
        token_mean.append(rec["token_mean_loss"])
        if val and (step % cfg.eval_every == 0 or step == cfg.steps):
            val_curve.append((step, evaluate(model, val, cfg)))
        if log is not None and step % max(cfg.steps // 4, 1) == 0 and step < cfg.steps:
            log(f"  {name}: step {step}/{cfg.steps}, {time.perf_counter() - t0:.0f} s, "
                f"token-mean loss {rec['token_mean_loss']:.3f}")
    seconds = time.perf_counter() - t0
    return {
        "strategy": strategy,
        "granularity": granularity,
        "seed": cfg.seed,
        "losses": np.stack(losses),  # [steps, S] per-sample training loss (S = b rows or b*F fragment slots)
        "bw": np.stack(rel),  # [steps, S] w / prior: b·w for rows, w_d / pi_d for fragments
        "share": np.stack(share),  # [steps, S] duplicated-token share q (NaN: empty slot)
        "n_tokens": np.stack(tokens),  # [steps, S]
        "token_mean_loss": np.array(token_mean),  # [steps] unweighted token-mean training loss
        "overflow_rows": overflow,
        "fragment_mismatch": mismatch,
        "val_curve": val_curve,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- summary
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


# ----------------------------------------------------------------------------- entry point
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


def _seeds_arg(text: str) -> tuple[int, ...]:
    """`3` -> (0, 1, 2); `0,5,7` -> (0, 5, 7)."""
    try:
        if "," in text:
            return tuple(int(t) for t in text.split(",") if t.strip())
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: a count N or a list like 0,1,2, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds: a count N >= 1, got {n} (one seed S: --seed S or --seeds S,)")
    return tuple(range(n))


def _parse(argv):
    d = DupConfig()
    ap = argparse.ArgumentParser(
        prog="titan-rw experiment duplicates",
        description="Duplicated documents in the embedded corpus: uniform vs LinUpper at equal steps, a sample "
        "being a packed row or a document fragment (validation loss; weight of duplicated vs unique samples; "
        "several seeds, paired against uniform).",
    )
    ap.add_argument("--out", default="runs/duplicates", help="output folder (default %(default)s)")
    ap.add_argument("--flavor", default=d.flavor, help="model flavor: tiny, debug (default %(default)s)")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="b, rows per step (default %(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="LR warm-up (default %(default)s)")
    ap.add_argument("--temperature", type=float, default=d.temperature, help="r (default %(default)s)")
    ap.add_argument("--temp-warmup-steps", type=int, default=d.temp_warmup_steps,
                    help="the paper's temperature warm-up (App. A.2): r = --warmup-temperature for this many "
                    "steps first, then --temperature (default %(default)s: none)")
    ap.add_argument("--warmup-temperature", "--temp-warmup-value", type=float, default=d.warmup_temperature,
                    help="r during the warm-up (paper: 100; default %(default)s; --temp-warmup-value is its "
                    "old name, still accepted)")
    ap.add_argument("--strategies", default=",".join(d.strategies), help="comma-separated (default %(default)s)")
    ap.add_argument("--granularity", default=d.granularity, choices=GRANULARITIES,
                    help="a sample is a packed row, a document fragment, or run both (default %(default)s)")
    ap.add_argument("--min-document-tokens", type=int, default=d.min_document_tokens,
                    help="document granularity: fragments with fewer tokens are not reweighted, they keep "
                    "their token share (titan_rw.documents.document_weights; default %(default)s)")
    ap.add_argument("--max-documents-per-row", "--max-documents", type=int, default=d.max_documents_per_row,
                    help="document fragments per row kept apart, the rest merged (reweight.max_documents_per_row; "
                    "default %(default)s; --max-documents is its old name, still accepted)")
    ap.add_argument("--check-uniform-document", action="store_true",
                    help="also run uniform at document granularity on the first seed (it should equal row)")
    ap.add_argument("--dup-fraction", type=float, default=d.dup_fraction, help="of documents (default %(default)s)")
    ap.add_argument("--copies", type=int, default=d.copies, help="occurrences of each duplicated document")
    ap.add_argument("--max-docs", type=int, default=None, help="subsample the documents (default: all)")
    ap.add_argument("--piece-chars", type=int, default=d.piece_chars,
                    help="cut documents into pieces of at most this many characters (default %(default)s)")
    ap.add_argument("--eval-every", type=int, default=d.eval_every, help="0: no validation")
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches, help="0: the whole held-out split")
    ap.add_argument("--seed", type=int, default=d.seed, help="one seed (default %(default)s)")
    ap.add_argument("--seeds", type=_seeds_arg, default=None,
                    help="several seeds: a count N (0..N-1) or a list 0,1,2; overrides --seed")
    ap.add_argument("--jobs", type=int, default=d.jobs, help="runs at once, in separate processes (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per run (default: torch's)")
    ap.add_argument("--no-plot", action="store_true", help="skip the figure")
    ap.add_argument("--quick", action="store_true", help="tiny model, 120 steps, 400 documents (~10 s a run)")
    a = ap.parse_args(argv)
    for old, new in (("--temp-warmup-value", "--warmup-temperature"), ("--max-documents", "--max-documents-per-row")):
        if any(x == old or x.startswith(old + "=") for x in (sys.argv[1:] if argv is None else argv)):
            print(f"duplicates: {old} is deprecated, use {new}", file=sys.stderr)
    return a


def config_from_args(a) -> DupConfig:
    cfg = DupConfig(
        flavor=a.flavor, steps=a.steps, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr,
        warmup_steps=a.warmup_steps, temperature=a.temperature, temp_warmup_steps=a.temp_warmup_steps,
        warmup_temperature=a.warmup_temperature,
        strategies=tuple(s.strip() for s in a.strategies.split(",") if s.strip()), granularity=a.granularity,
        min_document_tokens=a.min_document_tokens, max_documents_per_row=a.max_documents_per_row,
        check_uniform_document=a.check_uniform_document, dup_fraction=a.dup_fraction, copies=a.copies,
        max_docs=a.max_docs, piece_chars=a.piece_chars, eval_every=a.eval_every, eval_batches=a.eval_batches,
        seed=a.seed, seeds=a.seeds, jobs=a.jobs, threads=a.threads,
    )
    if a.quick:
        d = DupConfig()
        cfg.flavor, cfg.seq_len, cfg.window = "tiny", 64, 10
        # --quick sets the scale; --steps / --eval-every given explicitly still win
        cfg.steps = 120 if a.steps == d.steps else a.steps
        cfg.eval_every = 60 if a.eval_every == d.eval_every else a.eval_every
        cfg.eval_batches = 8 if a.eval_batches == d.eval_batches else a.eval_batches
        cfg.max_docs = cfg.max_docs or 400
        cfg.lr = 3e-3 if a.lr == d.lr else a.lr
    return cfg


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        cfg = config_from_args(a)
        os.makedirs(a.out, exist_ok=True)
        per_seed, first_raw = run(cfg, a.out)
    except ValueError as e:
        print(f"duplicates: {e}", file=sys.stderr)
        return 2
    png = None if a.no_plot else plot(first_raw, per_seed[0]["runs"], cfg, os.path.join(a.out, "duplicates.png"))
    agg = aggregate(per_seed)
    check = uniform_check(per_seed)
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "seeds": per_seed,
        "summary": agg,
        "uniform_check": check,
        "command": "python -m titan_rw.experiments.duplicates " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    info = per_seed[0]["data"]
    warm = f" ({cfg.warmup_temperature:g} for the first {cfg.temp_warmup_steps} steps)" if cfg.temp_warmup_steps else ""
    print(
        f"\nduplicates: {info['duplicated_pieces']}/{info['pieces_used']} documents x{cfg.copies} "
        f"({info['duplicate_char_share']:.0%} of the training text, seed {per_seed[0]['seed']}), llama {cfg.flavor}, "
        f"seq {cfg.seq_len}, b={cfg.batch_size}, {cfg.steps} steps, r={cfg.temperature:g}{warm}, "
        f"seeds {', '.join(str(s) for s in cfg.seed_list())}"
    )
    if len(per_seed) == 1:
        print(format_table(per_seed[0]["runs"], cfg))
    else:
        print(format_seed_table(per_seed, cfg))
        print("\nmean ± std over seeds (Δ: paired, same seed's uniform run):")
        print(format_summary_table(agg))
    if check:
        print(
            f"\nuniform, row vs document granularity (seed {check['seed']}): validation loss "
            f"{check['val_loss_row']:.6f} vs {check['val_loss_document']:.6f}; training loss (token mean) first "
            f"differs by > 1e-6 at step {check['first_step_train_loss_differs']}, max |Δ| "
            f"{check['max_train_loss_abs_diff']:.2e}"
        )
    print(f"results: {os.path.join(a.out, 'results.json')}" + (f"\nfigure: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

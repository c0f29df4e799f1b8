"""`titan-rw experiment duplicates` (= `python -m titan_rw.experiments.duplicates`): arguments,
the run set, results.json, the figure and the tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from titan_rw.experiments.duplicates.config import GRANULARITIES, DupConfig
from titan_rw.experiments.duplicates.runs import run
from titan_rw.experiments.duplicates.statistics import aggregate, uniform_check
from titan_rw.experiments.duplicates.tables import format_seed_table, format_summary_table, format_table, plot


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

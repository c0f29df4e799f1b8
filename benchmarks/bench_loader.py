#!/usr/bin/env python
"""Data benchmark (not a test): prints a table.

  1. TokenDataLoader from token shards (memory-mapped, one process, one core): rows/s, tokens/s
  2. streaming mode: parquet -> tokens at loader build (the embedded corpus), then serving
  3. datatrove tokenization (`titan-rw tokenize`), one worker: MB of text per second

    python benchmarks/bench_loader.py [--tokens 50e6] [--seq-len 2048 8192] [--batch 8]
    python benchmarks/bench_loader.py --quick    # CI smoke run (tests/test_benchmarks.py)

Goal from issue 4: >= 20 M tokens/s from shards on one core (a 7B H100 rank needs ~ 20 k tokens/s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def make_shards(root: str, n_tokens: int, n_shards: int = 4, mean_doc: int = 1000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = n_tokens // n_shards
    for s in range(n_shards):
        lens = rng.geometric(1 / mean_doc, size=2 * per // mean_doc + 16)
        ends = np.cumsum(lens)
        ends = ends[ends < per]
        ends = np.append(ends, per).astype("<u8")
        path = os.path.join(root, f"shard_{s:05d}.ds")
        rng.integers(3, 2048, size=per, dtype="<u2").tofile(path)
        ends.tofile(path + ".index")
        with open(path + ".metadata", "w") as f:
            f.write(f"bench|2\n{per}\n{per} T")


def bench_shards(root: str, seq_len: int, batch: int, seconds: float = 3.0) -> tuple[float, float]:
    from titan_rw.data.loader import TokenDataLoader

    dl = TokenDataLoader.Config(dataset_path=root, check_tokenizer=False).build(
        dp_world_size=8, dp_rank=3, tokenizer=None, seq_len=seq_len, local_batch_size=batch)
    it = iter(dl)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            x, y = next(it)
            n += 1
    dt = time.perf_counter() - t0
    return n * batch / dt, n * batch * seq_len / dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=50e6, help="synthetic shard tokens")
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--skip-tokenize", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 2 M shard tokens, seq 2048 only, 0.3 s per measurement, no tokenize")
    a = p.parse_args()
    if a.quick:
        a.tokens, a.seq_len, a.seconds, a.skip_tokenize = min(a.tokens, 2e6), [2048], 0.3, True

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import titan_rw  # noqa: F401
    from titan_rw.data import DEFAULT_TOKENIZER, EMBEDDED_TRAIN
    from titan_rw.data.loader import TokenDataLoader
    from titan_rw.data.tokenizer import SentencePieceTokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = os.path.join(tmp, "shards")
        os.makedirs(shard_dir)
        make_shards(shard_dir, int(a.tokens))
        for L in a.seq_len:
            r, t = bench_shards(shard_dir, L, a.batch, a.seconds)
            rows.append((f"shards (memmap), seq {L}, batch {a.batch}", f"{r:,.0f} rows/s", f"{t / 1e6:,.1f} M tokens/s"))

        tok = SentencePieceTokenizer(tokenizer_path=DEFAULT_TOKENIZER)
        text_bytes = sum(os.path.getsize(os.path.join(EMBEDDED_TRAIN, f)) for f in os.listdir(EMBEDDED_TRAIN))
        t0 = time.perf_counter()
        dl = TokenDataLoader.Config().build(dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=2048, local_batch_size=8)
        build = time.perf_counter() - t0
        n_tok = sum(d.source.n_tokens for d in dl.stream.datasets)
        rows.append(("parquet streaming: build (tokenize embedded train)", f"{build:.2f} s",
                     f"{n_tok / build / 1e6:,.2f} M tokens/s"))
        it = iter(dl)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            next(it)
            n += 1
        dt = time.perf_counter() - t0
        rows.append(("parquet streaming: serving, seq 2048, batch 8", f"{n * 8 / dt:,.0f} rows/s",
                     f"{n * 8 * 2048 / dt / 1e6:,.1f} M tokens/s"))

        if not a.skip_tokenize:
            import pyarrow.parquet as pq

            from titan_rw.data.tokenize import run_tokenize

            chars = sum(len(t) for f in sorted(os.listdir(EMBEDDED_TRAIN))
                        for t in pq.read_table(os.path.join(EMBEDDED_TRAIN, f), columns=["text"]).column(0).to_pylist())
            t0 = time.perf_counter()
            run_tokenize(EMBEDDED_TRAIN, os.path.join(tmp, "tok"), DEFAULT_TOKENIZER, workers=1, tasks=1, progress=False)
            dt = time.perf_counter() - t0
            rows.append(("datatrove tokenize, 1 worker (embedded train)", f"{chars / 1e6:.1f} M chars in {dt:.1f} s",
                         f"{chars / dt / 1e6:,.2f} MB text/s"))
        del text_bytes

    w = max(len(r[0]) for r in rows)
    print(f"{'benchmark':{w}s} | {'rate':>24s} | {'throughput':>20s}")
    print("-" * (w + 50))
    for r in rows:
        print(f"{r[0]:{w}s} | {r[1]:>24s} | {r[2]:>20s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

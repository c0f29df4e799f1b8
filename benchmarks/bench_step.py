"""Step time and peak memory of the reweighted step (not a test; numbers go to docs/performance.md).

    python benchmarks/bench_step.py [--flavor debug] [--seq 256] [--batch 8] [--steps 12] [--repeats 3]
    python benchmarks/bench_step.py --quick      # CI smoke run (tests/test_benchmarks.py): executes, tiny sizes

Side by side, one process, same model/config/data (synthetic rows), median over repeats of the
mean step time after 2 warm-up steps:
  - titan_rw LinUpper      vs  titan_rw uniform           (goal ≤ 1.01×)
  - titan_rw uniform       vs  stock TorchTitan Trainer   (goal ≤ 1.02×; TorchTitan's
                                                             ChunkedLossWrapper + CrossEntropyLoss)
  - LinUpper under gradient accumulation: reweight.scope global_batch vs microbatch (its cost)
  - peak memory of the per-sample loss path vs TorchTitan's chunked mean-loss path vs a naive
    full-logits per-sample CE (bytes allocated by the loss + backward, measured with
    torch.cuda's allocator peak on GPU; on CPU the peak of live tensor storage counted at the
    dispatcher, tests/memtrack.py).
Run it alone on the machine: on a shared 2-core CPU the step times are dominated by noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import titan_rw  # noqa: E402,F401
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _config(args, strategy, stock=False, accum=1, scope="microbatch"):
    from titan_rw import config as C

    cfg = C.from_args(None, [
        "--model.flavor", args.flavor, "--training.seq_len", str(args.seq), "--training.local_batch_size", str(args.batch),
        "--training.global_batch_size", str(args.batch * accum), "--reweight.scope", scope,
        "--training.steps", "1000000", "--data.loader", "synthetic",
        "--job.dump_folder", args.dump, "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false",
        "--reweight.strategy", strategy, "--reweight.warmup_steps", "0", "--logging.log_interval", "1000000",
        "--training.mixed_precision_param", "float32", "--compile.enable", str(args.compile).lower(),
    ])
    if stock:
        from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
        from torchtitan.trainer import Trainer

        from titan_rw.models import flavor

        import dataclasses

        kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Trainer.Config)}
        kw["loss"] = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=flavor(args.flavor).vocab_size))
        kw["metrics"].log_freq = 1_000_000
        return Trainer.Config(**kw)
    return cfg


def _time_trainer(trainer, steps):
    it = trainer.batch_generator(trainer.dataloader)
    times = []
    for i in range(steps + 2):
        trainer.step += 1
        t0 = time.perf_counter()
        trainer.train_step(it)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def bench_steps(args):
    """Builds each trainer once (one process group), repeats interleaved runs."""
    kinds = {"linupper": ("linupper", False), "uniform": ("uniform", False), "torchtitan": ("uniform", True)}
    trainers = {}
    first = None
    for name, (strategy, stock) in kinds.items():
        cfg = _config(args, strategy, stock)
        t = cfg.build()
        if first is None:
            first = t
        else:  # same weights for all
            sd = first.model_parts[0].state_dict()
            t.model_parts[0].load_state_dict(sd)
        trainers[name] = t
    res = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for name, t in trainers.items():
            res[name].append(_time_trainer(t, args.steps))
    return {k: statistics.median(v) for k, v in res.items()}


def bench_scope(args):
    """LinUpper with gradient accumulation (k = args.accum micro-batches): scope microbatch vs global_batch
    (exact weights over the optimizer step: a no-grad loss pre-pass). Returns median step times."""
    trainers = {}
    for scope in ("microbatch", "global_batch"):
        t = _config(args, "linupper", accum=args.accum, scope=scope).build()
        if trainers:
            t.model_parts[0].load_state_dict(next(iter(trainers.values())).model_parts[0].state_dict())
        trainers[scope] = t
    res = {k: [] for k in trainers}
    for _ in range(args.repeats):
        for name, t in trainers.items():
            res[name].append(_time_trainer(t, args.steps))
    return {k: statistics.median(v) for k, v in res.items()}


def bench_memory(args):
    """Peak bytes of loss+backward for B×T hidden states: per-sample chunked vs TorchTitan chunked vs naive."""
    from titan_rw.loss import per_sample_loss

    V, D, B, T = args.mem_vocab, args.mem_dim, args.batch, args.seq
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lm = torch.nn.Linear(D, V, bias=False, device=dev)
    h0 = torch.randn(B, T, D, device=dev)
    y = torch.randint(0, V, (B, T), device=dev)

    def peak(fn):
        if dev == "cuda":
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(); torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from memtrack import peak_bytes  # live tensor storage, counted at the dispatcher (tests/memtrack.py)

        return peak_bytes(fn)

    def ours():
        h = h0.clone().requires_grad_()
        f, _ = per_sample_loss(lm, h, y, num_chunks=8)
        (f * (1.0 / B)).sum().backward()

    def titan():
        from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss

        fn = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=V)).build()
        fn.set_lm_head(lm)
        h = h0.clone().requires_grad_()
        loss, _ = fn(h, y, torch.tensor(B * T, device=dev))

    def naive():
        h = h0.clone().requires_grad_()
        f = F.cross_entropy(lm(h).float().flatten(0, 1), y.flatten(), reduction="none").view(B, T).mean(1)
        (f / B).sum().backward()

    return {"per-sample (titan_rw)": peak(ours), "TorchTitan chunked mean": peak(titan), "naive full logits": peak(naive)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--flavor", default="debug")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--mem-vocab", type=int, default=32000)
    p.add_argument("--mem-dim", type=int, default=512)
    p.add_argument("--dump", default="/tmp/titan_rw_bench")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step for the scope benchmark")
    p.add_argument("--skip-scope", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny flavor, seq 64, batch 4, 2 steps, 1 repeat, small loss-memory case")
    args = p.parse_args()
    if args.quick:
        args.flavor, args.seq, args.batch, args.steps, args.repeats, args.accum = "tiny", 64, 4, 2, 1, 2
        args.mem_vocab, args.mem_dim = 4096, 128
    os.environ.setdefault("LOCAL_RANK", "0"); os.environ.setdefault("RANK", "0"); os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")

    mem = bench_memory(args)
    print(f"\nPeak memory of loss + backward, B={args.batch} T={args.seq} D={args.mem_dim} V={args.mem_vocab}")
    base = mem["TorchTitan chunked mean"]
    for k, v in mem.items():
        print(f"  {k:26s} {v / 2**20:9.1f} MiB   {v / base if base else float('nan'):6.2f}×")
    if args.skip_steps:
        return
    t = bench_steps(args)
    print(f"\nStep time ({args.flavor}, B={args.batch}, T={args.seq}, median of {args.repeats} × mean of {args.steps} steps)")
    print(f"  {'titan_rw linupper':26s} {t['linupper'] * 1e3:9.1f} ms   {t['linupper'] / t['uniform']:6.3f}× uniform (goal ≤ 1.01)")
    print(f"  {'titan_rw uniform':26s} {t['uniform'] * 1e3:9.1f} ms   {t['uniform'] / t['torchtitan']:6.3f}× TorchTitan (goal ≤ 1.02)")
    print(f"  {'stock TorchTitan trainer':26s} {t['torchtitan'] * 1e3:9.1f} ms")
    if args.skip_scope:
        return
    s = bench_scope(args)
    print(f"\nGradient accumulation, LinUpper, {args.accum} micro-batches of B={args.batch} per step "
          f"(median of {args.repeats} × mean of {args.steps} steps)")
    print(f"  {'scope microbatch':26s} {s['microbatch'] * 1e3:9.1f} ms")
    print(f"  {'scope global_batch':26s} {s['global_batch'] * 1e3:9.1f} ms   "
          f"{s['global_batch'] / s['microbatch']:6.3f}× microbatch (exact weights: + one no-grad forward)")


if __name__ == "__main__":
    main()

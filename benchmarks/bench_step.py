"""Step time and peak memory of the reweighted step (not a test; numbers go to docs/performance.md).

    python benchmarks/bench_step.py [--flavor debug] [--seq 256] [--batch 8] [--steps 12] [--repeats 3]
    python benchmarks/bench_step.py --quick      # CI smoke run (tests/test_benchmarks.py): executes, tiny sizes

Side by side, one process, same model/config/data (synthetic rows), median over repeats of the
mean step time after 2 warm-up steps. The kinds run interleaved STEP BY STEP (one step of each,
in an order rotated every step), so a load change on the machine hits all of them alike:
  - titan_rw LinUpper      vs  titan_rw uniform           (goal ≤ 1.01×)
  - titan_rw uniform       vs  stock TorchTitan Trainer   (goal ≤ 1.02×; TorchTitan's
                                                             ChunkedLossWrapper + CrossEntropyLoss)
  - LinUpper at reweight.granularity document  vs  row (the synthetic rows are one document each:
    the cost of the per-document losses and weights, not of more documents)
  - LinUpper with [float8] emulate = true  vs  without float8 (same parameter dtype; emulation
    casts to float8 and back and multiplies in high precision: its CPU cost says nothing of a GPU's
    float8 speed, which benchmarks/gpu_check.sh measures)
  - LinUpper under gradient accumulation: reweight.scope global_batch vs microbatch (its cost)
  - peak memory of the per-sample loss path vs TorchTitan's chunked mean-loss path vs a naive
    full-logits per-sample CE (bytes allocated by the loss + backward, measured with
    torch.cuda's allocator peak on GPU; on CPU the peak of live tensor storage counted at the
    dispatcher, tests/memtrack.py).
Each step is timed twice: wall time (time.perf_counter) and CPU time of the main thread
(time.thread_time), with ONE intra-op thread (torch.set_num_threads(1), and OMP_NUM_THREADS=1 when
unset): the step's compute then runs on the main thread (CPU autograd runs backward on the calling
thread), and a thread's CPU time does not count the time the machine gave to other processes. On a
shared machine the wall-time ratios swing (0.5× to 1.0× within an hour on 2 busy cores); the
CPU-time ratios are the ones to read there. On a GPU, read wall time (the CPU time is the host's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import titan_rw  # noqa: E402,F401
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _config(args, strategy, stock=False, accum=1, scope="microbatch", granularity="row", float8=False):
    from titan_rw import config as C

    extra = ["--reweight.granularity", granularity]
    if float8:
        extra += ["--float8.enable", "true", "--float8.emulate", "true"]
    cfg = C.from_args(None, [*extra,
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


def _interleaved(trainers: dict, steps: int, warmup: int = 2) -> dict:
    """One step of each trainer in turn (the order rotated every step), `warmup` + `steps` rounds:
    {name: (mean wall s, mean main-thread CPU s)} over the last `steps`."""
    its = {k: t.batch_generator(t.dataloader) for k, t in trainers.items()}
    names = list(trainers)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for i in range(steps + warmup):
        r = i % len(names)
        for name in names[r:] + names[:r]:
            t = trainers[name]
            t.step += 1
            w0, c0 = time.perf_counter(), time.thread_time()
            t.train_step(its[name])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            c1, w1 = time.thread_time(), time.perf_counter()
            if i >= warmup:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
    return {k: (statistics.fmean(wall[k]), statistics.fmean(cpu[k])) for k in names}


def _build_same_weights(configs: dict) -> dict:
    trainers, first = {}, None
    for name, cfg in configs.items():
        t = cfg.build()
        if first is None:
            first = t
        else:  # same weights for all (float8 modules keep the parameter names)
            t.model_parts[0].load_state_dict(first.model_parts[0].state_dict())
        trainers[name] = t
    return trainers


def _median_of_repeats(trainers, args) -> dict:
    """{name: (median wall s, median CPU s)} over args.repeats interleaved runs."""
    runs = [_interleaved(trainers, args.steps) for _ in range(args.repeats)]
    return {k: (statistics.median(r[k][0] for r in runs), statistics.median(r[k][1] for r in runs)) for k in trainers}


KINDS = {  # name: _config keyword arguments
    "linupper": {"strategy": "linupper"},
    "uniform": {"strategy": "uniform"},
    "torchtitan": {"strategy": "uniform", "stock": True},
    "document": {"strategy": "linupper", "granularity": "document"},
    "float8": {"strategy": "linupper", "float8": True},
}


def bench_steps(args):
    """Builds each trainer once (one process group), runs them interleaved step by step."""
    kinds = {k: v for k, v in KINDS.items() if k != "float8" or not args.skip_float8}
    return _median_of_repeats(_build_same_weights({k: _config(args, **kw) for k, kw in kinds.items()}), args)


def bench_scope(args):
    """LinUpper with gradient accumulation (k = args.accum micro-batches): scope microbatch vs global_batch
    (exact weights over the optimizer step: a no-grad loss pre-pass). {scope: (wall s, CPU s)}."""
    configs = {scope: _config(args, "linupper", accum=args.accum, scope=scope) for scope in ("microbatch", "global_batch")}
    return _median_of_repeats(_build_same_weights(configs), args)


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
    p.add_argument("--skip-float8", action="store_true", help="leave out the float8 (emulated) kind (no torchao)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny flavor, seq 64, batch 4, 2 steps, 1 repeat, small loss-memory case")
    args = p.parse_args()
    torch.set_num_threads(1)  # one intra-op thread: the step's CPU time is the main thread's
    from titan_rw.float8 import torchao_available

    if not args.skip_float8 and not torchao_available():
        print("bench_step: no torchao (pip install 'titan_rw[float8]'): the float8 kind is left out")
        args.skip_float8 = True
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
    how = f"median of {args.repeats} × mean of {args.steps} steps, kinds interleaved step by step"
    print(f"\nStep time ({args.flavor}, B={args.batch}, T={args.seq}, {how})")
    _step_table(t, 0, "wall")
    print(f"\nCPU time per step (time.thread_time of the main thread, {torch.get_num_threads()} intra-op "
          f"thread(s); the same steps)")
    _step_table(t, 1, "cpu")
    if args.skip_scope:
        return
    s = bench_scope(args)
    print(f"\nGradient accumulation, LinUpper, {args.accum} micro-batches of B={args.batch} per step ({how})")
    for i, label in ((0, "wall"), (1, "cpu")):
        print(f"  {label + ' scope microbatch':30s} {s['microbatch'][i] * 1e3:9.1f} ms")
        print(f"  {label + ' scope global_batch':30s} {s['global_batch'][i] * 1e3:9.1f} ms   "
              f"{s['global_batch'][i] / s['microbatch'][i]:6.3f}× microbatch (exact weights: + one no-grad forward)")


def _step_table(t: dict, i: int, label: str) -> None:
    """Rows "<label> <kind>  X ms  ratio× <reference>"; i = 0 wall, 1 CPU."""
    ms = lambda k: t[k][i] * 1e3  # noqa: E731
    print(f"  {label + ' titan_rw linupper':30s} {ms('linupper'):9.1f} ms   {t['linupper'][i] / t['uniform'][i]:6.3f}× uniform (goal ≤ 1.01)")
    print(f"  {label + ' titan_rw uniform':30s} {ms('uniform'):9.1f} ms   {t['uniform'][i] / t['torchtitan'][i]:6.3f}× TorchTitan (goal ≤ 1.02)")
    print(f"  {label + ' stock TorchTitan trainer':30s} {ms('torchtitan'):9.1f} ms")
    print(f"  {label + ' linupper document':30s} {ms('document'):9.1f} ms   {t['document'][i] / t['linupper'][i]:6.3f}× row granularity")
    if "float8" in t:
        print(f"  {label + ' linupper float8 emulated':30s} {ms('float8'):9.1f} ms   {t['float8'][i] / t['linupper'][i]:6.3f}× no float8")

if __name__ == "__main__":
    main()

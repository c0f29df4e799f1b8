"""One timed training run of the real trainer, for benchmarks/gpu_check.sh (works on CPU too).

    torchrun --standalone --nproc_per_node=N benchmarks/gpu_step.py --config FILE --warmup 4 \
        --out result.json [--section.key value ...]

Builds the run exactly as `python -m titan_rw.train` does (`titan_rw.config.from_args`, then
`config.build()` and `trainer.train()`: the compiled, FSDP-sharded, reweighted step) and wraps
`train_step` with a device synchronisation and a timer. After the run, rank 0 writes a JSON with:

- step_s: median wall time of the steps after the first `--warmup` ones (compilation, allocator
  warm-up), and every step's time;
- tokens_per_s_per_device: (global tokens per optimizer step / world size) / step_s;
- mfu_pct: TorchTitan's definition: num_flops_per_token (6·N_non-embedding + 12·l·h·q·t, from the
  model config, as its MetricsProcessor) × tokens/s/device / peak bf16 FLOPS of the device
  (torchtitan.tools.utils.get_peak_flops: H100 SXM / H200 989e12, A100 312e12, ...);
- peak memory (max over ranks): torch.cuda max_memory_allocated / max_memory_reserved over the
  timed steps (reset after the warm-up), and over the whole run;
- the last metrics.jsonl row's loss / max weight (a sanity check that the run trained).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import titan_rw  # noqa: E402,F401  (compat patches before torchtitan)
import torch  # noqa: E402


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=4, help="steps excluded from the timing (default 4)")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    return p.parse_known_args(argv)


def _last_metrics(path: str) -> dict:
    try:
        with open(path) as fh:
            lines = [ln for ln in fh if ln.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def main(argv=None) -> int:
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    for k, v in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29541")):
        os.environ.setdefault(k, v)
    from torchtitan.tools import utils
    from torchtitan.tools.logging import init_logger, logger

    from titan_rw import config as C

    init_logger()
    cfg = C.from_args(args.config, overrides)
    cuda = torch.cuda.is_available()
    trainer = cfg.build()
    times: list[float] = []
    peaks = {}
    inner = trainer.train_step

    def timed(data_iterator):
        if len(times) == args.warmup and cuda:
            peaks["run_alloc"] = torch.cuda.max_memory_allocated()
            peaks["run_reserved"] = torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inner(data_iterator)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    trainer.train_step = timed  # Trainer.train() calls self.train_step(...)
    try:
        trainer.train()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        mem = [0.0, 0.0, 0.0, 0.0]
        if cuda:
            mem = [
                float(torch.cuda.max_memory_allocated()),
                float(torch.cuda.max_memory_reserved()),
                float(max(peaks.get("run_alloc", 0), torch.cuda.max_memory_allocated())),
                float(max(peaks.get("run_reserved", 0), torch.cuda.max_memory_reserved())),
            ]
        if world > 1:
            t = torch.tensor(mem, device=trainer.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            mem = t.tolist()
        timed_steps = times[args.warmup:] or times[-1:]
        step_s = statistics.median(timed_steps) if timed_steps else float("nan")
        tr = cfg.training
        tokens_per_step = getattr(trainer, "tokens_per_step", None) or tr.global_batch_size * tr.seq_len
        tps_dev = tokens_per_step / world / step_s if step_s > 0 else None
        flops_per_token = trainer.metrics_processor.num_flops_per_token
        name = torch.cuda.get_device_name() if cuda else "cpu"
        peak_flops = utils.get_peak_flops(name) if cuda else None
        gib = 2.0**30
        result = {
            "strategy": trainer.config.reweight.strategy,
            "device": name,
            "world_size": world,
            "flavor": getattr(cfg.model_spec, "flavor", None),
            "seq_len": tr.seq_len,
            "local_batch_size": tr.local_batch_size,
            "global_batch_size": tr.global_batch_size,
            "tokens_per_step": tokens_per_step,
            "compile": cfg.compile.enable,
            "mixed_precision_param": tr.mixed_precision_param,
            "steps": len(times),
            "warmup": args.warmup,
            "step_times_s": times,
            "step_s": step_s,
            "tokens_per_s_per_device": tps_dev,
            "num_flops_per_token": flops_per_token,
            "peak_flops": peak_flops,
            "mfu_pct": 100.0 * flops_per_token * tps_dev / peak_flops if (cuda and tps_dev and peak_flops) else None,
            "peak_alloc_gib": mem[0] / gib if cuda else None,
            "peak_reserved_gib": mem[1] / gib if cuda else None,
            "peak_alloc_gib_incl_warmup": mem[2] / gib if cuda else None,
            "peak_reserved_gib_incl_warmup": mem[3] / gib if cuda else None,
            "total_mem_gib": torch.cuda.get_device_properties(0).total_memory / gib if cuda else None,
            "last_metrics": _last_metrics(getattr(trainer, "metrics_path", os.path.join(cfg.dump_folder, "metrics.jsonl"))),
            "torch": torch.__version__,
        }
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
            logger.info(
                f"gpu_step: {result['strategy']} step {step_s * 1e3:.1f} ms, {tps_dev or 0:,.0f} tokens/s/device, "
                f"MFU {result['mfu_pct']}, peak alloc {result['peak_alloc_gib']} GiB -> {args.out}"
            )
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
- the last metrics.jsonl row's loss / max weight (a sanity check that the run trained);
- float8_linears: how many Linear layers are torchao Float8Linear ([float8], titan_rw.float8).

With `--stock` the run is stock TorchTitan instead: TorchTitan 0.3.0's own `Trainer` (no titan_rw
step) with its `ChunkedLossWrapper` + `CrossEntropyLoss` (the chunked mean loss), built from the same
`Trainer.Config` fields (model, parallelism, compile, optimizer, data), the baseline of "uniform / stock".

With `--smoke` (gpu_check.sh's first, short run) it also checks, and records under "smoke" with
"ok" (exit 1 when a check fails):

- finite_losses: every step's per-sample losses (valid samples) and logged loss are finite;
- weights_sum_to_1: the weights of every reweighting group of every step sum to 1 (fp32 tolerance);
- no_graph_capture: the step body is the trainer's plain `_forward_backward_body` (not TorchTitan's
  CUDA-graph wrapper) and its Python ran for every micro-batch of every step (a replay would not);
- document_mask: a row of two documents through the trained model, as training feeds it
  (`post_dataloading_process`: on GPU TorchTitan's FlexAttention document mask): the second
  document's hidden states do not change when the first document's tokens do. Required on CUDA;
  on CPU reported only (the CPU attention is titan_rw's own).
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
    p.add_argument("--smoke", action="store_true", help="also run the smoke checks (see the module doc)")
    p.add_argument("--stock", action="store_true",
                   help="stock TorchTitan: its own Trainer with its ChunkedLossWrapper + CrossEntropyLoss (the chunked "
                        "mean loss, no reweighting) on the same model and config")
    p.add_argument("--label", default=None, help="the run's name in the JSON (default: the strategy)")
    return p.parse_known_args(argv)


def _last_metrics(path: str) -> dict:
    try:
        with open(path) as fh:
            lines = [ln for ln in fh if ln.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def _all_metrics(path: str) -> list[dict]:
    try:
        with open(path) as fh:
            return [json.loads(ln) for ln in fh if ln.strip()]
    except (OSError, ValueError):
        return []


def _document_isolation(trainer) -> dict:
    """Hidden states of document B in a row [A | B] with A's tokens changed: max |difference|."""
    L = trainer.config.training.seq_len
    half = L // 2
    vocab = trainer.model_config.vocab_size
    g = torch.Generator().manual_seed(1234)
    row = torch.randint(1, vocab, (1, L), generator=g)
    other = row.clone()
    other[0, :half] = torch.randint(1, vocab, (half,), generator=g)
    positions = torch.cat([torch.arange(half), torch.arange(L - half)]).unsqueeze(0)
    outs = []
    model = trainer.model_parts[0]
    with torch.no_grad():
        for tokens in (row, other):
            input_dict = {"input": tokens.to(trainer.device), "positions": positions.to(trainer.device)}
            inputs, _, extra = trainer.post_dataloading_process(input_dict, tokens.to(trainer.device))
            with trainer.train_context():
                outs.append(model(inputs, **extra).float())
    diff_b = (outs[0][:, half:] - outs[1][:, half:]).abs().max()
    diff_a = (outs[0][:, :half] - outs[1][:, :half]).abs().max()
    scale = outs[0][:, half:].abs().max()
    return {"max_diff_doc_b": float(diff_b), "max_diff_doc_a": float(diff_a), "scale": float(scale),
            "attention_masks": type(extra.get("attention_masks")).__name__,
            "inner_attention": type(trainer.model_config.first_attention.inner_attention).__qualname__}


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
    if args.stock:
        cfg = _stock(cfg)
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
        if args.smoke:  # after the timing: what the step's Python did (device tensors, read at the end)
            probes["fb_calls"].append(trainer._fb_calls)
            probes["weight_sums"].append([grp.weights.sum() for grp in trainer._groups])
            probes["losses_finite"].append([bool(torch.isfinite(grp.losses[grp.valid]).all()) for grp in trainer._groups])

    probes: dict[str, list] = {"fb_calls": [], "weight_sums": [], "losses_finite": []}
    trainer.train_step = timed  # Trainer.train() calls self.train_step(...)
    try:
        trainer.train()
        smoke = _smoke(trainer, probes) if args.smoke else None
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
        from titan_rw.float8 import float8_modules

        strategy = "torchtitan" if args.stock else trainer.config.reweight.strategy
        result = {
            "label": args.label or strategy,
            "strategy": strategy,
            "stock_torchtitan": args.stock,
            "float8_linears": len(float8_modules(trainer.model_parts[0])),
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
        if smoke is not None:
            rows = _all_metrics(getattr(trainer, "metrics_path", os.path.join(cfg.dump_folder, "metrics.jsonl")))
            logged = [r.get("loss") for r in rows if "loss" in r]
            smoke["finite_losses"]["logged_losses"] = logged
            smoke["finite_losses"]["ok"] = bool(
                smoke["finite_losses"]["ok"] and logged and all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in logged))
            smoke["ok"] = all(c["ok"] for k, c in smoke.items() if isinstance(c, dict) and c.get("required", True))
            result["smoke"] = smoke
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
            logger.info(
                f"gpu_step: {result['label']} step {step_s * 1e3:.1f} ms, {tps_dev or 0:,.0f} tokens/s/device, "
                f"MFU {result['mfu_pct']}, peak alloc {result['peak_alloc_gib']} GiB -> {args.out}"
            )
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 1 if (args.smoke and not result["smoke"]["ok"]) else 0


def _stock(cfg):
    """The same run as stock TorchTitan: `Trainer.Config` with the fields `cfg` shares with it, and
    TorchTitan's chunked mean loss (what TorchTitan's llama3 configs train with)."""
    import dataclasses

    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.trainer import Trainer

    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Trainer.Config)}
    kw["loss"] = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=cfg.model_spec.model.vocab_size))
    return Trainer.Config(**kw)


def _smoke(trainer, probes: dict) -> dict:
    k = trainer.gradient_accumulation_steps
    sums = [[float(s) for s in step] for step in probes["weight_sums"]]
    plain = trainer.fwd_bwd_fn == trainer._forward_backward_body
    iso = _document_isolation(trainer)
    tol = 1e-5 * max(iso["scale"], 1.0)
    return {
        "finite_losses": {"ok": bool(probes["losses_finite"]) and all(all(s) for s in probes["losses_finite"])},
        "weights_sum_to_1": {"ok": bool(sums) and all(step and all(abs(x - 1.0) < 1e-4 for x in step) for step in sums),
                             "sums": sums},
        "no_graph_capture": {"ok": plain and probes["fb_calls"] == [k] * len(probes["fb_calls"]),
                             "fwd_bwd_fn": type(trainer.fwd_bwd_fn).__name__ if not plain else "_forward_backward_body",
                             "body_calls_per_step": probes["fb_calls"], "micro_batches": k},
        "document_mask": {**iso, "ok": iso["max_diff_doc_b"] <= tol and iso["max_diff_doc_a"] > tol,
                          "tolerance": tol},  # CPU and GPU attention are both document-causal
    }


if __name__ == "__main__":
    raise SystemExit(main())

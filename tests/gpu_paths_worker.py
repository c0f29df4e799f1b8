"""Subprocess helper of tests/test_gpu_paths.py: the real `ReweightTrainer`, built from the shipped
configs with a tiny model, on the code paths the GPU configs take.

    python tests/gpu_paths_worker.py cuda_graphs OUT.json DUMP
        one process: for every train_configs/*.toml, the step function TorchTitan's Trainer chose,
        with its CUDA-graph wrapper's device check bypassed (a stand-in that marks what it wraps).
    torchrun --nproc_per_node 2 tests/gpu_paths_worker.py paths OUT.json DUMP
        2 gloo ranks, 3 steps each of: FSDP fp32, FSDP bf16 parameters with fp32 reduction (the
        1.4B/7B setting), HSDP fp32 (dp_replicate 2 × dp_shard 1, a 2-D data-parallel mesh).
Rank 0 writes OUT.json.
"""

import glob
import json
import os
import sys

from helpers import ROOT  # noqa: E402


def tiny(path, dump, *extra):
    """The config file's own values, with a tiny model, short rows and no checkpoint writes."""
    from titan_rw import config as C

    return C.from_args(path, ["--model.flavor", "tiny", "--training.seq_len", "64", "--job.dump_folder", dump,
                              "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false", *extra])


def cuda_graphs(out, dump):
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29733"))
    import logging

    import titan_rw  # noqa: F401
    import torchtitan.trainer as tt_trainer
    from torchtitan.tools.logging import logger

    said = []

    class Said(logging.Handler):
        def emit(self, record):
            if "CUDA-graph" in record.getMessage():
                said.append(record.getMessage())

    logger.addHandler(Said(level=logging.INFO))
    logger.setLevel(logging.INFO)

    def would_capture(fn):  # what wrap_with_cuda_graph returns on an NVIDIA GPU: a replaying wrapper
        def captured(*args, **kwargs):
            raise AssertionError("the step runs under CUDA-graph capture")

        captured.wrapped = fn
        return captured

    tt_trainer.wrap_with_cuda_graph = would_capture
    res = {}
    configs = sorted(glob.glob(os.path.join(ROOT, "train_configs", "*.toml")))
    for path in configs:
        cfg = tiny(path, os.path.join(dump, os.path.basename(path)), "--data.loader", "synthetic")
        said.clear()
        res[os.path.basename(path)] = {**_chosen(cfg), "log": list(said)}
    # a Config built in Python keeps TorchTitan's default (capture on): the trainer turns it off
    cfg = tiny(configs[0], os.path.join(dump, "python"), "--data.loader", "synthetic")
    cfg.training.disable_cuda_graphs = False
    said.clear()
    res["python_default"] = {**_chosen(cfg), "log": list(said)}
    with open(out, "w") as f:
        json.dump(res, f)


def _chosen(cfg):
    trainer = cfg.build()
    try:
        return {"plain_body": trainer.fwd_bwd_fn == trainer._forward_backward_body,
                "wrapped": hasattr(trainer.fwd_bwd_fn, "wrapped"),
                "disable_cuda_graphs": trainer.config.training.disable_cuda_graphs}
    finally:
        trainer.close()


def paths(out, dump):
    import titan_rw  # noqa: F401
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from obs_helpers import keep_step_groups

    debug = os.path.join(ROOT, "train_configs", "debug_cpu.toml")
    common = ["--training.steps", "3", "--training.local_batch_size", "2", "--training.global_batch_size", "4",
              "--reweight.scope", "microbatch", "--reweight.warmup_steps", "1", "--logging.log_interval", "1",
              "--lr_scheduler.warmup_steps", "1"]
    runs = {
        "fp32": [],
        "bf16": ["--training.mixed_precision_param", "bfloat16", "--training.mixed_precision_reduce", "float32"],
        "hsdp": ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"],
    }
    res = {}
    for name, extra in runs.items():
        trainer = tiny(debug, os.path.join(dump, name), *common, *extra).build()
        last = keep_step_groups(trainer)
        model = trainer.model_parts[0]
        p = next(iter(model.parameters()))
        local_losses, steps = [], []
        step_fn = trainer.forward_backward_step

        def recording(**kw):  # the body's return value: this rank's  sum_local w_i f_i / k
            loss = step_fn(**kw)
            local_losses.append(loss.detach().clone())
            return loss

        trainer.forward_backward_step = recording
        it = trainer.batch_generator(trainer.dataloader)
        for _ in range(3):
            trainer.step += 1
            local_losses.clear()
            trainer.train_step(it)
            groups = last["groups"]
            local = torch.stack(local_losses).sum()
            dist.all_reduce(local)  # the ranks' slices together: the whole groups' weighted loss
            steps.append({
                "weight_sums": [float(g.weights.sum()) for g in groups],
                "min_weight": min(float(g.weights.min()) for g in groups),
                "weighted_loss": sum(float(g.weighted_loss) for g in groups),
                "mean_loss": sum(float(g.mean_loss) for g in groups) / len(groups),
                "sum_of_local": float(local),
            })
        with open(trainer.run_logger.metrics_path) as f:
            rows = [json.loads(line) for line in f]
        pd = trainer.parallel_dims
        res[name] = {
            "steps": steps,
            "metrics": [{k: r.get(k) for k in ("step", "loss", "weighted_loss", "grad_norm")} for r in rows],
            "dp_rank": trainer.dp_rank, "dp_size": trainer.dp_size, "rank": dist.get_rank(),
            "dp_replicate": pd.dp_replicate, "dp_shard": pd.dp_shard,
            "mesh_ndim": p.device_mesh.ndim if isinstance(p, DTensor) else 0,
            "placements": [str(x) for x in p.placements] if isinstance(p, DTensor) else [],
            "param_dtype": str(getattr(getattr(model, "_get_fsdp_state", lambda: None)(), "_mp_policy", None)),
        }
        trainer.close()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, res)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out, dump = sys.argv[1:4]
    {"cuda_graphs": cuda_graphs, "paths": paths}[mode](out, dump)

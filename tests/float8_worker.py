"""Run under torchrun (2 gloo ranks) by tests/test_float8.py: a float8 (emulated) trainer next to the
same trainer without float8, holding the same weights, on the same hand-made batch.

Writes (rank 0) a JSON to argv[1] with: the Linear modules each model has and which are torchao
Float8Linear; the per-sample losses of both on the same rows (gathered over both ranks); the sums of
the weights of every reweighting group of one float8 optimizer step (2 micro-batches); whether the
float8 model's parameters are plain tensors under their usual names.
"""

import json
import os
import sys

import titan_rw  # noqa: F401
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titan_rw import config as C
from titan_rw.float8 import float8_modules
from titan_rw.synthetic import synthetic_row

from obs_helpers import keep_step_groups

SEQ, B_LOCAL = 32, 4


def main(out_path):
    common = [
        "--model.flavor", "tiny", "--training.seq_len", str(SEQ), "--training.local_batch_size", str(B_LOCAL),
        "--training.global_batch_size", str(B_LOCAL * 2 * 2), "--training.steps", "100",
        "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false", "--data.loader", "synthetic",
        "--training.mixed_precision_param", "float32", "--logging.log_interval", "1000",
        "--reweight.strategy", "linupper", "--reweight.warmup_steps", "0", "--reweight.scope", "microbatch",
    ]
    dump = os.environ["RW_DUMP"]
    plain = C.from_args(None, [*common, "--job.dump_folder", dump + "/plain"]).build()
    f8 = C.from_args(None, [*common, "--job.dump_folder", dump + "/f8", "--float8.enable", "true",
                            "--float8.emulate", "true"]).build()
    f8.model_parts[0].load_state_dict(plain.model_parts[0].state_dict())  # the same weights
    rank = plain.dp_rank

    def linears(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))

    res = {"plain_linears": linears(plain.model_parts[0]), "f8_linears": linears(f8.model_parts[0]),
           "f8_modules": sorted(float8_modules(f8.model_parts[0])),
           "plain_float8_modules": float8_modules(plain.model_parts[0])}
    p_names = [n for n, _ in plain.model_parts[0].named_parameters()]
    f_params = list(f8.model_parts[0].named_parameters())
    res["same_param_names"] = p_names == [n for n, _ in f_params]
    res["plain_tensor_params"] = all(
        type(p.to_local() if isinstance(p, DTensor) else p) in (torch.Tensor, torch.nn.Parameter)
        and (p.to_local() if isinstance(p, DTensor) else p).dtype == torch.float32 for _, p in f_params)

    # the same rows through both models: per-sample losses (this rank's, then gathered)
    g_rows = [synthetic_row(11, 500 + i, SEQ, 2048) for i in range(4 * B_LOCAL)]  # 2 micro-batches x 2 ranks
    batches = []
    for j in range(2):
        rows = torch.stack(g_rows[(2 * j + rank) * B_LOCAL:(2 * j + rank + 1) * B_LOCAL])
        batches.append(({"input": rows[:, :-1]}, rows[:, 1:]))
    losses = {}
    for name, t in (("plain", plain), ("f8", f8)):
        with torch.no_grad():
            f = torch.cat([t._per_sample(x["input"], y, {})[0] for x, y in batches])
        every = [torch.zeros_like(f) for _ in range(dist.get_world_size())]
        dist.all_gather(every, f.contiguous())
        losses[name] = torch.cat(every).tolist()
    res["losses"] = losses

    # one real float8 optimizer step: the weights of each group (a micro-batch over both ranks)
    kept = keep_step_groups(f8)
    f8.step += 1
    f8.train_step(iter(batches))
    res["weight_sums"] = [float(g.weights.sum()) for g in kept["groups"]]
    res["group_sizes"] = [int(g.weights.numel()) for g in kept["groups"]]
    res["grad_norm_finite"] = bool(all(torch.isfinite(
        (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)).all() for p in f8.model_parts[0].parameters()))
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(res, fh)
    f8.close()
    plain.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

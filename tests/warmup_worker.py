"""Run under torchrun (2 gloo ranks) by tests/test_warmup_mode.py: the gradient of a uniform burn-in
step and of the step after it, against float64 single-process references (docs/design.md §2).

One trainer (tiny Llama, FSDP2 over 2 ranks, fp32 parameters, no clipping) with `[reweight]
warmup_mode = "uniform"`, `warmup_steps = 1`, strategy linupper at r = 0.5. Each step gets hand-made
full rows (one document each) and runs one real `train_step`; its full gradients are compared with a
float64 copy of the model holding the same weights:

- step 1 (burn-in): the plain token-mean cross-entropy over the global batch (F.cross_entropy, mean
  over every token), and the logged weights are exactly 1/b;
- step 2: sum_i w_i grad f_i, with w from the paper's formulas in float64 Python here (min-max onto
  [-1, 1], s = min(h + 1, 1), softmax(s / r)).

`training.steps = 1` (the loop here runs two steps by hand): the burn-in covers the configured run, so
the config check on each rank has a warning to give, which the test counts. Writes a JSON of errors
and scales (rank 0) to argv[1].
"""

import json
import math
import os
import sys

import titan_rw  # noqa: F401
import torch
import torch.distributed as dist
import torch.nn.functional as F

from obs_helpers import keep_step_groups
from titan_rw import config as C
from titan_rw.synthetic import synthetic_row
from helpers import full  # noqa: E402  (tests/helpers.py: the script runs from tests/)

SEQ, B_LOCAL, R = 32, 2, 0.5


def linupper_weights(f: list[float], r: float) -> list[float]:
    lo, hi = min(f), max(f)
    s = [min(2.0 * (x - lo) / (hi - lo) - 1.0 + 1.0, 1.0) for x in f]
    m = max(s)
    e = [math.exp((x - m) / r) for x in s]
    return [x / math.fsum(e) for x in e]


def main(out_path):
    cfg = C.from_args(None, [
        "--model.flavor", "tiny", "--training.seq_len", str(SEQ), "--training.local_batch_size", str(B_LOCAL),
        "--training.global_batch_size", str(B_LOCAL * 2), "--training.max_norm", "1e9", "--training.steps", "1", "--lr_scheduler.warmup_steps", "0",
        "--job.dump_folder", os.environ["RW_DUMP"], "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false",
        "--data.loader", "synthetic", "--training.mixed_precision_param", "float32", "--logging.log_interval", "1000",
        "--reweight.strategy", "linupper", "--reweight.temperature", str(R), "--reweight.warmup_steps", "1",
        "--reweight.warmup_mode", "uniform",
    ])
    trainer = cfg.build()
    last = keep_step_groups(trainer)
    rank, dp = trainer.dp_rank, trainer.dp_size
    model = trainer.model_parts[0]
    plain = trainer.model_config.build()
    b = B_LOCAL * dp
    results = {}
    for step in (1, 2):
        params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        g_rows = [synthetic_row(11, 100 * step + i, SEQ, 2048) for i in range(b)]  # global order
        rows = torch.stack(g_rows[rank * B_LOCAL:(rank + 1) * B_LOCAL])
        local = [({"input": rows[:, :-1], "positions": torch.arange(SEQ).expand(B_LOCAL, SEQ)}, rows[:, 1:])]
        trainer.step = step
        trainer.train_step(iter(local))
        grads = {n: full(p.grad).detach().double() for n, p in model.named_parameters()}
        stats = last["groups"][0]

        ref = plain.double()  # floating tensors only: `.to(torch.float64)` would also cast RoPE's complex cache
        ref.load_state_dict({n: v.double() for n, v in params.items()}, strict=False)
        x = torch.stack(g_rows)

        def grad_of(loss_fn):
            ref.zero_grad()
            logits = ref(x[:, :-1], positions=torch.arange(SEQ).expand(b, SEQ))
            tok = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(b, SEQ)
            loss_fn(tok).backward()
            return {n: p.grad.detach().clone() for n, p in ref.named_parameters()}, tok.mean(1).detach()

        token_mean, f = grad_of(lambda tok: tok.mean())  # the plain loss: every token weighs 1 / (b·T)
        w_ref = linupper_weights(f.tolist(), R)
        weighted, _ = grad_of(lambda tok: (torch.tensor(w_ref, dtype=torch.float64) * tok.mean(1)).sum())

        def err(a, c):
            return max(float((a[n] - c[n]).abs().max()) for n in c)

        want, other = (token_mean, weighted) if step == 1 else (weighted, token_mean)
        results[f"step{step}"] = {
            "grad_err": err(grads, want),
            "other_err": err(grads, other),  # vs the other rule: how far apart the two are
            "grad_scale": max(float(g.abs().max()) for g in want.values()),
            "weights_exact_uniform": bool(torch.equal(stats.weights, torch.full((b,), 1.0) / b)),
            "weights_err": float((stats.weights.double() - torch.tensor(w_ref, dtype=torch.float64)).abs().max()),
            "strategy": trainer._settings.strategy,  # the step's (ReweightSettings)
        }
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""Run under torchrun (2 gloo ranks) by tests/test_trainer.py: the reweighted step's gradients
against a single-process reference  Σ_i w_i ∇f_i  over the global batch.

One trainer is built (tiny Llama, FSDP2 over 2 ranks); each case feeds it hand-made global
batches, lets it run one optimizer step, and compares the full gradients to a plain model
holding the same weights. Writes a JSON of max errors (rank 0) to argv[1].
"""

import json
import os
import sys

import titan_rw  # noqa: F401
import torch
import torch.distributed as dist
import torch.nn.functional as F

from obs_helpers import keep_step_groups
from titan_rw import config as C
from titan_rw.reweight import sample_weights
from titan_rw.synthetic import synthetic_row
from helpers import full, reweight_as_configured  # noqa: E402  (tests/helpers.py: the script runs from tests/)

SEQ, B_LOCAL = 32, 2


def main(out_path):
    cfg = C.from_args(None, [
        "--model.flavor", "tiny", "--training.seq_len", str(SEQ), "--training.local_batch_size", str(B_LOCAL),
        "--training.global_batch_size", str(B_LOCAL * 2), "--training.max_norm", "1e9", "--training.steps", "100",
        "--job.dump_folder", os.environ["RW_DUMP"], "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false",
        "--data.loader", "synthetic", "--training.mixed_precision_param", "float32", "--logging.log_interval", "1000",
    ])
    trainer = cfg.build()
    last = keep_step_groups(trainer)
    rank, dp = trainer.dp_rank, trainer.dp_size
    model = trainer.model_parts[0]
    plain = trainer.model_config.build()
    results, row = {}, 1000

    def case(name, strategy, k, scope, temperature=1.0, cap=None):
        nonlocal row
        trainer.rw.strategy, trainer.rw.scope, trainer.rw.cap = strategy, scope, cap
        reweight_as_configured(trainer)
        trainer.temperature_schedule.target = trainer.temperature_schedule.warmup_temperature = temperature
        trainer.gradient_accumulation_steps = k
        params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        g_rows = [synthetic_row(7, row + i, SEQ, 2048) for i in range(k * B_LOCAL * dp)]  # global order
        row += len(g_rows)
        local = []
        for j in range(k):  # micro-batch j: global rows [j·B, (j+1)·B), this rank's slice
            rows = torch.stack(g_rows[j * B_LOCAL * dp + rank * B_LOCAL: j * B_LOCAL * dp + (rank + 1) * B_LOCAL])
            local.append(({"input": rows[:, :-1], "positions": torch.arange(SEQ).expand(B_LOCAL, SEQ)}, rows[:, 1:]))
        trainer.step += 1
        trainer.train_step(iter(local))
        grads = {n: full(p.grad).detach() for n, p in model.named_parameters()}
        stats = last["groups"]

        # ---- reference: one process, full logits, Σ w_i ∇f_i
        plain.load_state_dict(params, strict=False)
        plain.zero_grad()
        x = torch.stack(g_rows)
        logits = plain(x[:, :-1])
        tok = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none").view(len(g_rows), SEQ)
        f = tok.mean(1)
        if scope == "global_batch" or k == 1:
            w = sample_weights(f.detach(), strategy, temperature, cap=cap)
            ref_loss = (w * f).sum()
        else:
            B = B_LOCAL * dp
            ref_loss = sum((sample_weights(f[j * B:(j + 1) * B].detach(), strategy, temperature, cap=cap)
                            * f[j * B:(j + 1) * B]).sum() for j in range(k)) / k
        ref_loss.backward(retain_graph=True)
        err = max(float((grads[n] - p.grad).abs().max()) for n, p in plain.named_parameters())
        ref_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
        plain.zero_grad()
        f.mean().backward(inputs=list(plain.parameters()))  # plain mean: how far reweighting moves the gradient
        moved = max(float((ref_grads[n] - p.grad).abs().max()) for n, p in plain.named_parameters())
        scale = max(float(p.grad.abs().max()) for p in plain.named_parameters() for p in [p[1]])
        res = {"grad_err": err, "grad_scale": scale, "moved": moved,
               "loss_err": abs(float(torch.stack([s.mean_loss for s in stats]).mean()) - float(f.mean()))}
        if strategy == "uniform":
            # TorchTitan's own loss: token-summed CE / global valid tokens, on the same logits
            from torchtitan.components.loss import cross_entropy_loss
            plain.zero_grad()
            logits = plain(x[:, :-1])
            tt = cross_entropy_loss(logits, x[:, 1:]) / x[:, 1:].numel()
            tt.backward()
            res["tt_grad_err"] = max(float((grads[n] - p.grad).abs().max()) for n, p in plain.named_parameters())
            res["tt_loss_err"] = abs(float(tt) - float(torch.stack([s.mean_loss for s in stats]).mean()))
        results[name] = res

    case("linupper", "linupper", 1, "microbatch")
    case("quadratic", "quadratic", 1, "microbatch", temperature=0.5)
    case("linupper_cap", "linupper", 1, "microbatch", temperature=0.05, cap=2.0)
    case("linupper_accum_microbatch", "linupper", 2, "microbatch")
    case("quadratic_accum_global", "quadratic", 2, "global_batch")
    case("linupper_accum_global", "linupper", 3, "global_batch", temperature=0.3)
    case("uniform", "uniform", 2, "microbatch")
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

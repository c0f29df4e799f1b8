"""Run under torchrun (1 or 2 gloo ranks) by tests/test_documents_trainer.py: the reweighted step at
`reweight.granularity = "document"` against a single-process float64 reference.

One trainer is built (tiny Llama, FSDP2 when 2 ranks, max_documents_per_row = 4,
min_document_tokens = 4); each case feeds it hand-made packed rows with several documents each
(positions restarting at 0 inside rows), lets it run one optimizer step and compares its full
gradients with a plain model holding the same weights:

- uniform: the gradient of the plain token-mean cross-entropy of the group (F.cross_entropy, mean
  over every valid token; no fragments involved);
- linupper (capped or not): sum_d w_d grad f_d with f_d, pi_d and w_d computed here from the
  rows' known document layout, in float64 Python.

The rows (seq 32, F = 4 slots, min 4 tokens): one document; a 3-token fragment inside; 5 fragments
(the tail [7, 10] merged into slot 3); a 2-token continuation at the start; padded labels (the
last fragment empty); exactly 4 fragments; a 3-token fragment at the end. Writes a JSON of errors
and reference quantities (rank 0) to argv[1].
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
from helpers import full, reweight_as_configured  # noqa: E402  (tests/helpers.py: the script runs from tests/)
from torch.distributed.tensor import DTensor  # noqa: E402

SEQ, B_LOCAL, SLOTS, MIN_TOKENS = 32, 2, 4, 4
IGNORE = -100

# (document lengths along the row's 32 input positions, padded labels at the row's end)
POOL = [
    ([32], 0),               # one document
    ([10, 3, 19], 0),        # a short fragment (3 < 4 tokens) inside
    ([5, 4, 6, 7, 10], 0),   # 5 fragments > 4 slots: [7, 10] merged into slot 3 (overflow row)
    ([2, 30], 0),            # a short continuation at the row start
    ([12, 14, 6], 6),        # padded labels: the last fragment has no valid token (empty slot)
    ([8, 8, 8, 8], 0),       # exactly 4 fragments: no overflow
    ([20, 9, 3], 0),         # a short fragment at the end
    ([16, 16], 3),           # padded labels: the last fragment has 13 valid tokens
]


def make_row(layout, pad, gen):
    """(tokens [SEQ + 1], positions [SEQ], labels [SEQ], slot of each input position [SEQ])."""
    assert sum(layout) == SEQ
    x = torch.randint(0, 2048, (SEQ + 1,), generator=gen)
    pos = torch.cat([torch.arange(n) for n in layout])
    slot = torch.cat([torch.full((n,), min(i, SLOTS - 1)) for i, n in enumerate(layout)])
    labels = x[1:].clone()
    if pad:
        labels[-pad:] = IGNORE
    return x, pos, labels, slot, len(layout) > SLOTS


def ref_document_weights(f, n, merged, strategy, r, cap):
    """Float64 Python: w_d over all slots of one group (lists f_d, n_d, merged_d). Empty slots 0;
    short (n < MIN_TOKENS or merged) at pi_d = n_d / N; the long ones share P = their pi mass by
    pi_d e^{s_d / r}, s = min(h + 1, 1), h = min-max of f over the long onto [-1, 1]; with cap c:
    w_d = min(lam * P * v_d, c * pi_d), lam by bisection (sum w_long = P)."""
    N = float(sum(n))
    pi = [x / N for x in n]
    long = [n[i] >= MIN_TOKENS and not merged[i] for i in range(len(f))]
    w = [pi[i] if (n[i] > 0 and not long[i]) else 0.0 for i in range(len(f))]
    L = [i for i in range(len(f)) if long[i]]
    if not L:
        return w, pi
    P = sum(pi[i] for i in L)
    if strategy == "uniform":
        s = {i: 0.0 for i in L}
    else:
        lo, hi = min(f[i] for i in L), max(f[i] for i in L)
        s = {i: min(2 * (f[i] - lo) / (hi - lo) - 1 + 1, 1.0) for i in L}
    z = {i: pi[i] * math.exp(s[i] / r) for i in L}
    tot = sum(z.values())
    v = {i: z[i] / tot for i in L}  # sums to 1 over the long fragments
    if cap is None:
        for i in L:
            w[i] = P * v[i]
        return w, pi
    a, b = 1.0, 1e6  # sum_i min(lam P v_i, c pi_i) is increasing in lam; find it = P
    for _ in range(200):
        m = (a + b) / 2
        if sum(min(m * P * v[i], cap * pi[i]) for i in L) < P:
            a = m
        else:
            b = m
    for i in L:
        w[i] = min(a * P * v[i], cap * pi[i])
    return w, pi


def main(out_path):
    cfg = C.from_args(None, [
        "--model.flavor", "tiny", "--training.seq_len", str(SEQ), "--training.local_batch_size", str(B_LOCAL),
        "--training.global_batch_size", str(B_LOCAL * int(os.environ["WORLD_SIZE"])), "--training.max_norm", "1e9",
        "--training.steps", "100", "--job.dump_folder", os.environ["RW_DUMP"], "--checkpoint.enable", "false",
        "--metrics.enable_tensorboard", "false", "--data.loader", "synthetic", "--training.mixed_precision_param",
        "float32", "--logging.log_interval", "1000", "--reweight.granularity", "document",
        "--reweight.max_documents_per_row", str(SLOTS), "--reweight.min_document_tokens", str(MIN_TOKENS),
    ])
    trainer = cfg.build()
    last = keep_step_groups(trainer)
    rank, dp = trainer.dp_rank, trainer.dp_size
    model = trainer.model_parts[0]
    plain = trainer.model_config.build()
    results = {}
    seed = [1000]

    def one_step(rows, k):
        """One optimizer step of the trainer on the global rows (micro-batch j, DP rank, row order).
        Returns (params before, gradients, WeightStats of the step)."""
        params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        local = []
        for j in range(k):
            lo = j * B_LOCAL * dp + rank * B_LOCAL
            mine = rows[lo: lo + B_LOCAL]
            x = torch.stack([r[0] for r in mine])
            local.append(({"input": x[:, :-1], "positions": torch.stack([r[1] for r in mine])},
                          torch.stack([r[2] for r in mine])))
        trainer.step += 1
        trainer.train_step(iter(local))
        grads = {n: full(p.grad).detach() for n, p in model.named_parameters()}
        return params, grads, last["groups"]

    def draw(start, count):
        gen = torch.Generator().manual_seed(seed[0])
        seed[0] += 1
        return [make_row(*POOL[(start + i) % len(POOL)], gen) for i in range(count)]

    def ref_fragments(params, rows):
        """Reference per-token NLL (float64 cross-entropy of the plain model's logits), the per-slot
        f_d (autograd), n_d and merged flags, row by row in the global order."""
        plain.load_state_dict(params, strict=False)
        plain.zero_grad()
        x = torch.stack([r[0] for r in rows])
        pos = torch.stack([r[1] for r in rows])
        labels = torch.stack([r[2] for r in rows])
        logits = plain(x[:, :-1], positions=pos)
        tok = F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), reduction="none",
                              ignore_index=IGNORE).view(labels.shape)
        f, n, merged = [], [], []
        for i, (_, _, lab, slot, over) in enumerate(rows):
            for d in range(SLOTS):
                sel = (slot == d) & (lab != IGNORE)
                cnt = int(sel.sum())
                f.append(tok[i][sel].sum() / cnt if cnt else tok.new_zeros(()))
                n.append(cnt)
                merged.append(bool(over and d == SLOTS - 1))
        return logits, labels, tok, f, n, merged

    def compare(grads, ref_loss_fn):
        plain.zero_grad()
        ref_loss_fn().backward(retain_graph=True)
        err = max(float((grads[n] - p.grad.to(grads[n].dtype)).abs().max()) for n, p in plain.named_parameters())
        scale = max(float(p.grad.abs().max()) for p in plain.parameters())
        return err, scale, {n: p.grad.clone() for n, p in plain.named_parameters()}

    def case(name, strategy, k, scope, start, temperature=1.0, cap=None):
        trainer.rw.strategy, trainer.rw.scope, trainer.rw.cap, trainer.rw.granularity = strategy, scope, cap, "document"
        reweight_as_configured(trainer)
        trainer.temperature_schedule.target = trainer.temperature_schedule.warmup_temperature = temperature
        trainer.gradient_accumulation_steps = k
        rows = draw(start, k * B_LOCAL * dp)
        params, grads, stats = one_step(rows, k)
        logits, labels, tok, f, n, merged = ref_fragments(params, rows)
        per_group = 1 if scope == "global_batch" else k  # reweighting groups in the step
        g_slots = len(f) // per_group
        fv = [float(x.detach()) for x in f]
        w_ref, pi_ref = [], []
        for g in range(per_group):
            sl = slice(g * g_slots, (g + 1) * g_slots)
            w, pi = ref_document_weights(fv[sl], n[sl], merged[sl], strategy, temperature, cap)
            w_ref.append(w)
            pi_ref.append(pi)

        def weighted():  # sum_g (1 / groups) sum_d w_d f_d  (microbatch scope: each group's loss / k)
            return sum(sum(w * f[g * g_slots + i] for i, w in enumerate(w_ref[g]) if w > 0)
                       for g in range(per_group)) / per_group

        err, scale, ref_grads = compare(grads, weighted)
        tw = torch.cat([s.weights.double() for s in stats])
        tp = torch.cat([s.prior.double() for s in stats])
        flat_w = torch.tensor(sum(w_ref, []), dtype=torch.float64)
        flat_pi = torch.tensor(sum(pi_ref, []), dtype=torch.float64)
        res = {
            "groups": len(stats), "grad_err": err, "grad_scale": scale,
            "weight_err": float((tw - flat_w).abs().max()), "prior_err": float((tp - flat_pi).abs().max()),
            "max_ratio": [float(s.max_ratio) for s in stats],
            "ref_max_ratio": [max(w / p for w, p in zip(wg, pg) if p > 0) for wg, pg in zip(w_ref, pi_ref)],
            "overflow_rows": [int(s.overflow_rows) for s in stats],
            "ref_overflow_rows": [sum(1 for r in rows[g * len(rows) // per_group:(g + 1) * len(rows) // per_group]
                                      if r[4]) for g in range(per_group)],
            "weights_sum": [float(s.weights.double().sum()) for s in stats],
            "mean_loss_err": max(abs(float(s.mean_loss) - sum(p * x for p, x in zip(pg, fv[g * g_slots:(g + 1) * g_slots])))
                                 for g, (s, pg) in enumerate(zip(stats, pi_ref))),
            "weighted_loss_err": max(abs(float(s.weighted_loss) - sum(w * x for w, x in zip(wg, fv[g * g_slots:(g + 1) * g_slots])))
                                     for g, (s, wg) in enumerate(zip(stats, w_ref))),
            "short_long": [sum(1 for x in n if 0 < x < MIN_TOKENS), sum(1 for x in n if x >= MIN_TOKENS)],
            "empty_slots": sum(1 for x in n if x == 0),
        }
        # The plain token-mean cross-entropy of each group (no fragments), and how far the step moved from it
        rows_per_group = len(rows) // per_group

        def token_mean():
            return sum(F.cross_entropy(logits[g * rows_per_group:(g + 1) * rows_per_group].double().flatten(0, 1),
                                       labels[g * rows_per_group:(g + 1) * rows_per_group].flatten(),
                                       ignore_index=IGNORE) for g in range(per_group)) / per_group

        t_err, _, tm_grads = compare(grads, token_mean)
        res["token_mean_grad_err"] = t_err
        res["moved"] = max(float((ref_grads[k] - tm_grads[k]).abs().max()) for k in ref_grads)
        if scope == "microbatch" and k > 1:  # not the token mean over the whole step: per group, / k
            def step_token_mean():
                return F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            res["step_token_mean_grad_err"] = compare(grads, step_token_mean)[0]
        results[name] = res

    def rows_vs_documents(start):
        """Every row one document: granularity document gives the row weights (slot 0 of each row)."""
        trainer.rw.strategy, trainer.rw.scope, trainer.rw.cap = "linupper", "microbatch", None
        reweight_as_configured(trainer)
        trainer.temperature_schedule.target = trainer.temperature_schedule.warmup_temperature = 0.5
        trainer.gradient_accumulation_steps = 1
        gen = torch.Generator().manual_seed(seed[0])
        seed[0] += 1
        rows = [make_row([SEQ], 0, gen) for _ in range(B_LOCAL * dp)]
        local_before = [p.to_local().detach().clone() if isinstance(p, DTensor) else p.detach().clone()
                        for p in model.parameters()]
        trainer.rw.granularity = "document"
        _, _, st_doc = one_step(rows, 1)
        with torch.no_grad():  # the same parameters again
            for p, v in zip(model.parameters(), local_before):
                (p.to_local() if isinstance(p, DTensor) else p).copy_(v)
        trainer.rw.granularity = "row"
        _, _, st_row = one_step(rows, 1)
        trainer.rw.granularity = "document"
        wd = st_doc[0].weights.view(-1, SLOTS)
        wr = st_row[0].weights
        results["rows_vs_documents"] = {
            "weight_err": float((wd[:, 0] - wr).abs().max()), "other_slots": float(wd[:, 1:].abs().max()),
            "loss_err": float((st_doc[0].losses.view(-1, SLOTS)[:, 0] - st_row[0].losses).abs().max()),
            "spread": float(wr.max() - wr.min()), "b": int(st_row[0].b),
        }

    case("uniform_microbatch", "uniform", 1, "microbatch", start=0)
    case("linupper_microbatch", "linupper", 1, "microbatch", start=2, temperature=0.5)
    case("uniform_global", "uniform", 2, "global_batch", start=1)
    case("linupper_global", "linupper", 2, "global_batch", start=3, temperature=0.5)
    case("linupper_cap_global", "linupper", 2, "global_batch", start=5, temperature=0.05, cap=2.0)
    case("uniform_accum_microbatch", "uniform", 2, "microbatch", start=4)
    rows_vs_documents(0)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

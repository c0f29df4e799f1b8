"""One run: the model, the loaders, the step (Algorithm 1 through `titan_rw.loss.reweighted_loss`,
the trainer's weighted loss) and the loop with its per-sample records and validation curve."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from titan_rw.experiments.duplicates.config import DupConfig
from titan_rw.experiments.duplicates.data import fragment_dup_share, row_dup_share
from titan_rw.reweight import TemperatureSchedule


def _build_model(cfg: DupConfig):
    from titan_rw.models import model_config

    torch.manual_seed(cfg.seed)
    model = model_config(cfg.flavor).build()
    model.init_weights(buffer_device=None)
    model._skip_lm_head = True  # the loss applies the output projection itself
    return model


def _loader(cfg: DupConfig, **kw):
    from titan_rw.data.loader import TokenDataLoader

    return TokenDataLoader.Config(seed=cfg.seed, **kw).build(
        dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=cfg.seq_len, local_batch_size=cfg.batch_size
    )


def validation_batches(cfg: DupConfig) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    dl = _loader(cfg, dataset="embedded_validation", infinite=False, shuffle=False)
    out = []
    for input_dict, labels in dl:
        out.append((input_dict["input"], input_dict["positions"], labels))
        if cfg.eval_batches and len(out) >= cfg.eval_batches:
            break
    return out


@torch.no_grad()
def evaluate(model, batches, cfg: DupConfig) -> float:
    from titan_rw.loss import per_sample_loss

    model.eval()
    tot, n = 0.0, 0
    for inp, pos, lab in batches:
        f, nv = per_sample_loss(model.lm_head, model(inp, positions=pos), lab, num_chunks=cfg.loss_chunks)
        tot += float((f * nv).sum())
        n += int(nv.sum())
    model.train()
    return tot / max(n, 1)


def step_loss(model, inputs, positions, labels, *, granularity: str, strategy: str, temperature: float,
              cfg: DupConfig) -> tuple[torch.Tensor, dict]:
    """One batch: the weighted loss sum_i w_i f_i (Alg. 1 line 8) with autograd, and a detached
    record of its samples (numpy, flat): losses f, weights w, prior (uniform weight: 1/b per row,
    token share n_d / N per fragment), n_tokens; empty fragment slots have n_tokens 0 and prior 0."""
    from titan_rw.documents import document_losses
    from titan_rw.loss import ReweightSettings, per_sample_loss, per_token_nll, reweighted_loss

    settings = ReweightSettings(strategy, min_document_tokens=cfg.min_document_tokens)  # one process, no cap
    hidden = model(inputs, positions=positions)
    extra = {}
    if granularity == "row":
        f, n = per_sample_loss(model.lm_head, hidden, labels, num_chunks=cfg.loss_chunks)
        loss, st = reweighted_loss(f, torch.tensor(float(temperature)), settings, valid=n > 0)
        prior = st.valid.float() / st.b.clamp(min=1)
    elif granularity == "document":
        # Alg. 1 over the fragments of the batch, on top of their token shares (titan_rw.documents)
        nll = per_token_nll(model.lm_head, hidden, labels, num_chunks=cfg.loss_chunks)
        d = document_losses(nll, labels, positions, cfg.max_documents_per_row)
        f, n = d.losses.reshape(-1), d.n_tokens.reshape(-1)
        loss, st = reweighted_loss(f, torch.tensor(float(temperature)), settings, valid=n > 0, n_tokens=n,
                                   merged=d.merged.reshape(-1))
        prior = st.prior
        extra["overflow_rows"] = int((d.overflow > 0).sum())
    else:
        raise ValueError(f"unknown granularity {granularity!r}; valid: row, document")
    w = st.weights
    fd = f.detach().double()
    nd = n.double()
    rec = {
        "losses": fd.numpy(),
        "weights": w.detach().double().numpy(),
        "prior": prior.detach().double().numpy(),
        "n_tokens": nd.numpy(),
        "token_mean_loss": float((torch.where(nd > 0, fd, 0.0) * nd).sum() / nd.sum().clamp(min=1)),
        **extra,
    }
    return loss, rec


def train_one(strategy: str, cfg: DupConfig, train_path: str, dup: set[str], val, log=None,
              granularity: str = "row") -> dict:
    model = _build_model(cfg)
    dl = _loader(cfg, dataset_path=train_path, format="parquet")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )

    def lr_factor(step):  # step counts from 0 here; warm-up then cosine to 10 %
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    temp = TemperatureSchedule(
        target=cfg.temperature, warmup_temperature=cfg.warmup_temperature, warmup_steps=cfg.temp_warmup_steps
    )
    it = iter(dl)
    rel, losses, share, tokens, token_mean = [], [], [], [], []
    overflow = mismatch = 0
    val_curve = [(0, evaluate(model, val, cfg))] if val else []
    name = f"{strategy} ({granularity}, seed {cfg.seed})"
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        input_dict, labels = next(it)
        prov = dl.last_provenance
        loss, rec = step_loss(
            model, input_dict["input"], input_dict["positions"], labels, granularity=granularity,
            strategy=strategy, temperature=temp(step), cfg=cfg,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_norm)
        opt.step()
        sched.step()
        if granularity == "row":
            q = row_dup_share(prov, dup)
        else:
            q2 = fragment_dup_share(prov, dup, cfg.max_documents_per_row)
            # the provenance's documents and the fragments found from the positions must agree
            mismatch += int((np.isfinite(q2.reshape(-1)) != (rec["n_tokens"] > 0)).sum())
            overflow += rec["overflow_rows"]
            q = q2.reshape(-1)
        prior = rec["prior"]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel.append(np.where(prior > 0, rec["weights"] / prior, np.nan))
        losses.append(np.where(rec["n_tokens"] > 0, rec["losses"], np.nan))
        share.append(q)
        tokens.append(rec["n_tokens"])
        token_mean.append(rec["token_mean_loss"])
        if val and (step % cfg.eval_every == 0 or step == cfg.steps):
            val_curve.append((step, evaluate(model, val, cfg)))
        if log is not None and step % max(cfg.steps // 4, 1) == 0 and step < cfg.steps:
            log(f"  {name}: step {step}/{cfg.steps}, {time.perf_counter() - t0:.0f} s, "
                f"token-mean loss {rec['token_mean_loss']:.3f}")
    seconds = time.perf_counter() - t0
    return {
        "strategy": strategy,
        "granularity": granularity,
        "seed": cfg.seed,
        "losses": np.stack(losses),  # [steps, S] per-sample training loss (S = b rows or b*F fragment slots)
        "bw": np.stack(rel),  # [steps, S] w / prior: b·w for rows, w_d / pi_d for fragments
        "share": np.stack(share),  # [steps, S] duplicated-token share q (NaN: empty slot)
        "n_tokens": np.stack(tokens),  # [steps, S]
        "token_mean_loss": np.array(token_mean),  # [steps] unweighted token-mean training loss
        "overflow_rows": overflow,
        "fragment_mismatch": mismatch,
        "val_curve": val_curve,
        "seconds": seconds,
    }

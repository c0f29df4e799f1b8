"""Short real runs for the observability tests (single process, CPU, a few seconds).

A tiny bigram language model (embedding -> output projection) trains on rows of the shipped
corpus from `TokenDataLoader`; the per-sample losses come from `titan_rw.loss.per_sample_loss`,
the weights and `WeightStats` from `titan_rw.loss.reweighted_loss`, the provenance from the
loader's `last_provenance`. `RunLogger` logs it exactly as the trainer would. Runs are built
once per pytest session and shared by test_report and the browser test (about rendering the
logs); the statistics themselves are tested on the real trainer in test_observability.
"""

from __future__ import annotations

import functools
import os

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import torch
from torch import nn

from titan_rw.data import EMBEDDED_TRAIN
from titan_rw.loss import ReweightSettings, per_sample_loss, reweighted_loss
from titan_rw.observability.run_logger import RunLogger

STEPS = 40
B = 16
SEQ = 32
CORPUS_FILES = (
    sorted(os.path.join(EMBEDDED_TRAIN, f) for f in os.listdir(EMBEDDED_TRAIN) if f.endswith(".parquet"))
    if os.path.isdir(EMBEDDED_TRAIN)
    else []
)


def corpus_ids() -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in CORPUS_FILES:
        ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return ids


class Bigram(nn.Module):
    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)


def train_run(folder: str, *, strategy: str, temperature: float, cap: float | None = None, seed: int = 0) -> str:
    from titan_rw.data.loader import TokenDataLoader
    from titan_rw.data.tokenizer import SentencePieceTokenizer
    from titan_rw.data import DEFAULT_TOKENIZER

    torch.manual_seed(seed)
    tok = SentencePieceTokenizer(tokenizer_path=DEFAULT_TOKENIZER)
    loader = TokenDataLoader(TokenDataLoader.Config(seed=seed), tokenizer=tok, seq_len=SEQ, local_batch_size=B)
    model = Bigram(tok.get_vocab_size())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rl = RunLogger.Config(log_interval=10, histogram_interval=10, samples_interval=20, top_k=3).build(
        folder, 0, static={"strategy": strategy}, total_steps=STEPS, decode=tok.decode,
        num_flops_per_token=6 * sum(p.numel() for p in model.parameters()), peak_flops=1e12,
    )
    for step in range(1, STEPS + 1):
        inp, labels = loader.next_batch()
        prov = loader.last_provenance
        losses, n_valid = per_sample_loss(model.lm_head, model.emb(inp["input"]), labels, num_chunks=2)
        loss, stats = reweighted_loss(losses, temperature, ReweightSettings(strategy, cap=cap), valid=n_valid > 0)
        opt.zero_grad()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rl.record(
            step, stats, temperature=temperature, provenance=prov, inputs=inp["input"],
            ntokens=int(labels.numel()), extra={"lr": 0.05, "grad_norm": gnorm},
        )
        if rl.is_log_step(step):
            rl.flush()
    rl.close()
    return folder


def event_dirs(run_dir: str) -> list[str]:
    """Directories under run_dir holding TensorBoard event files."""
    return sorted({root for root, _, files in os.walk(run_dir) if any(f.startswith("events.out.tfevents") for f in files)})


def keep_step_groups(trainer) -> dict:
    """box["groups"]: the WeightStats of the trainer's latest step, as it hands them to its RunLogger
    (device tensors; every rank, also where the logger writes nothing)."""
    box: dict = {}
    record_step = trainer.run_logger.record_step

    def keep(rec):
        box["groups"] = rec.groups
        return record_step(rec)

    trainer.run_logger.record_step = keep
    return box


@functools.lru_cache(maxsize=None)
def runs(base: str) -> dict[str, str]:
    """{'linupper': dir, 'uniform': dir}, built once per base directory."""
    os.makedirs(base, exist_ok=True)
    return {
        "linupper": train_run(os.path.join(base, "linupper"), strategy="linupper", temperature=0.5),
        "uniform": train_run(os.path.join(base, "uniform"), strategy="uniform", temperature=1.0),
    }


def shared_runs(tmp_path_factory) -> dict[str, str]:
    if not CORPUS_FILES:
        import pytest

        pytest.skip(f"the embedded corpus is not there yet ({EMBEDDED_TRAIN})")
    return runs(str(tmp_path_factory.getbasetemp() / "obs_runs"))

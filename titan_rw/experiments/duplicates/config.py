"""The experiment's settings (`DupConfig`): model, data, reweighting and run-set sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from titan_rw.reweight import DEFAULT_MAX_DOCUMENTS, DEFAULT_MIN_DOCUMENT_TOKENS

DEFAULT_STRATEGIES = ("uniform", "linupper")
GRANULARITIES = ("row", "document", "both")


@dataclass
class DupConfig:
    flavor: str = "debug"
    seq_len: int = 256
    batch_size: int = 16  # b: rows per step, the reweighting group (one micro-batch, one process)
    steps: int = 400
    lr: float = 1e-3
    warmup_steps: int = 20  # LR warm-up
    weight_decay: float = 0.01
    max_norm: float = 1.0
    temperature: float = 1.0  # r (paper: 1.0 for 1.4B)
    temp_warmup_steps: int = 0  # steps at warmup_temperature before r (App. A.2: r = 100)
    warmup_temperature: float = 100.0
    strategies: tuple[str, ...] = field(default=DEFAULT_STRATEGIES)
    granularity: str = "row"  # row | document | both
    dup_fraction: float = 0.05  # of the documents (pieces)
    copies: int = 20  # total occurrences of each duplicated document
    piece_chars: int = 2000
    max_docs: int | None = None  # subsample the pieces; None = all
    seed: int = 0  # the seed of one run set (data selection, shuffles, row order, model init)
    seeds: tuple[int, ...] | None = None  # several run sets; None = (seed,)
    min_document_tokens: int = DEFAULT_MIN_DOCUMENT_TOKENS  # shorter fragments keep their token share
    max_documents_per_row: int = DEFAULT_MAX_DOCUMENTS  # fragment slots per row; more are merged into the last
    check_uniform_document: bool = False  # also run uniform at document granularity (first seed)
    jobs: int = 1  # runs at once (separate processes)
    threads: int | None = None  # torch intra-op threads per run process
    eval_every: int = 100
    eval_batches: int = 24  # validation batches of batch_size rows (None/0 = the whole split)
    loss_chunks: int = 4
    window: int = 20  # steps per point of the training curves in the figure

    def seed_list(self) -> tuple[int, ...]:
        return tuple(self.seeds) if self.seeds else (self.seed,)

    def granularities(self) -> tuple[str, ...]:
        return ("row", "document") if self.granularity == "both" else (self.granularity,)

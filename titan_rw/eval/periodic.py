"""Evaluate the model being trained, in memory: `evaluate_model(model, tokenizer, tasks, limit)`.

Off by default. The trainer calls it every N steps on every rank (FSDP all-gathers the weights
inside the forward, so all ranks must run the same requests — they do: lm-eval is
deterministic here and each rank evaluates everything); rank 0 logs the returned metrics.

    from titan_rw.eval.periodic import evaluate_model
    if eval_interval and step % eval_interval == 0:
        metrics = evaluate_model(self.model_parts[0], self.tokenizer, ["titan_rw_local_ppl"], limit=16,
                                 max_length=self.config.training.seq_len)
        # {"eval/titan_rw_local_ppl/bits_per_byte": 2.31, ...} → TensorBoard / metrics.jsonl

The model keeps its `_skip_lm_head` setting and its train/eval mode; no gradients are taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, slots=True)
class PeriodicEvalConfig:
    """`[periodic_eval]`: lm-eval tasks on the model being trained, every `interval` steps (off: 0).

    Every rank runs the same requests (FSDP gathers the weights in the forward); rank 0 logs the
    scores as `eval/<task>/<metric>` in metrics.jsonl and TensorBoard. Offline: the default task is
    one of the two shipped with titan_rw (titan_rw/eval/tasks), so nothing is downloaded."""

    interval: int = 0
    """Steps between evaluations; 0: never."""
    tasks: list[str] = field(default_factory=lambda: ["titan_rw_local_ppl"])
    """lm-eval task names or titan_rw presets (local, paper, ...)."""
    limit: int = 16
    """Examples per task (0: all)."""
    batch_size: int = 8

    def validate(self) -> None:
        for key, low, what in (("interval", 0, "0: never"), ("limit", 0, "0: all examples"), ("batch_size", 1, "")):
            v = getattr(self, key)
            if v < low:
                raise ValueError(f"periodic_eval.{key} = {v} is not allowed: it must be >= {low}" + (f" ({what})" if what else ""))
        if self.interval and not self.tasks:
            raise ValueError("periodic_eval.tasks is empty while periodic_eval.interval > 0")

    def scores(self, step: int, model, tokenizer, *, max_length: int) -> dict[str, float]:
        """The scores of the model at `step` when an evaluation is due ({} otherwise). Every rank."""
        if not self.interval or step % self.interval != 0:
            return {}
        return evaluate_model(model, tokenizer, list(self.tasks), self.limit or None,
                              max_length=max_length, batch_size=self.batch_size)


def evaluate_model(model, tokenizer, tasks: str | list[str] = "local", limit: int | float | None = None, *,
                   max_length: int | None = None, batch_size: int = 8, offline: bool = True,
                   flavor: str | None = None) -> dict[str, float]:
    """Run lm-eval tasks on an in-memory titan_rw model → {"eval/<task>/<metric>": value}.

    `model`: a titan_rw Llama (plain or FSDP-wrapped); `tokenizer`: a SentencePieceTokenizer (or a
    path to its .model); `tasks`: preset name(s) or lm-eval task names; `limit`: examples per task.
    """
    import torch

    from titan_rw.eval.adapter import TitanRWLM
    from titan_rw.eval.presets import expand
    from titan_rw.eval.runner import evaluate

    was_training = model.training
    try:
        lm = TitanRWLM(model=model, tokenizer=tokenizer, max_length=max_length or 2048, batch_size=batch_size,
                       flavor=flavor)
        with torch.no_grad():
            results = evaluate(lm, expand(tasks), limit=limit, offline=offline, bootstrap_iters=0)
    finally:
        model.train(was_training)
    return flatten(results)


def flatten(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    if not results:  # lm-eval returns None where LOCAL_RANK != 0 (that rank still ran every forward)
        return out
    for task, res in results.get("results", {}).items():
        for key, v in res.items():
            if "," not in key or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            out[f"eval/{task}/{key.split(',')[0]}"] = float(v)
    return out

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

from typing import Any


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

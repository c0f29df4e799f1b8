"""Evaluation with lm-evaluation-harness (docs/evaluating.md).

    titan_rw.eval.adapter.TitanRWLM   lm-eval model `titan_rw` (registered on import of the adapter)
    titan_rw.eval.cli.eval_main       `titan-rw eval RUN_DIR|CHECKPOINT --tasks ...` / `--compare A B`
    titan_rw.eval.presets             task presets: `paper` (the paper's 19 tasks), `local`
    titan_rw.eval.periodic.evaluate_model   evaluate an in-memory model (e.g. during training)
    TASKS_DIR                         the shipped local tasks (lm-eval `TaskManager(include_path=...)`)

This file imports neither torch nor lm_eval.
"""

import os as _os

TASKS_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "tasks")

__all__ = ["TASKS_DIR"]

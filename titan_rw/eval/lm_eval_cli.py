"""`titan-rw-lm-eval`: lm-evaluation-harness's own command line, with titan_rw's model and tasks known.

    titan-rw-lm-eval --model titan_rw --model_args pretrained=runs/debug_cpu \\
        --tasks titan_rw_local_mc,titan_rw_local_ppl --output_path runs/debug_cpu/lm_eval
    titan-rw-lm-eval --model hf --model_args pretrained=runs/debug_cpu/hf,max_length=128 \\
        --tasks titan_rw_local_mc,titan_rw_local_ppl
    titan-rw-lm-eval ls tasks

Every argument is lm-eval's (`lm_eval --help`), and so are the output (its results table with
stderr, `--output_path` JSON, `--log_samples`, W&B ...) and the exit codes. lm-eval 0.4 finds
models only in its own registry and has no plugin entry point for them, so a plain `lm_eval`
process does not know `titan_rw`; this entry point, before handing the arguments to
`lm_eval.__main__.cli_evaluate`:
- registers the model `titan_rw` (`titan_rw.eval.adapter.TitanRWLM`, imported only when used);
- adds the shipped local tasks (`titan_rw_local_mc`, `titan_rw_local_ppl`) with
  `--include_path`, unless the command line gives its own include path;
- adds `--device cpu` when the command line names no device and there is no CUDA (lm-eval's
  `hf` model would otherwise ask for cuda).
In Python, `import titan_rw.eval.adapter` registers the model for `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

import sys

MODEL_TARGET = "titan_rw.eval.adapter:TitanRWLM"


def register() -> None:
    """Make `--model titan_rw` known to lm-eval (lazily: torch is imported only when it is used)."""
    import lm_eval.models  # noqa: F401  (lm-eval lists its own models only while its registry is empty: first)
    from lm_eval.api.registry import model_registry

    if "titan_rw" not in model_registry:
        model_registry.register("titan_rw", target=MODEL_TARGET)


def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def lm_eval_argv(argv: list[str]) -> list[str]:
    """The command line handed to lm-eval: ours plus the task path and, without CUDA, `--device cpu`."""
    from titan_rw.eval import TASKS_DIR

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    command = argv[0] if argv[0] in ("run", "ls", "validate") else None
    if command is None and len(argv) > 1:
        argv.insert(0, "run")  # lm-eval's legacy form (`lm_eval --model ...`), made explicit
        command = "run"
    if command in ("run", "ls", "validate") and not _has(argv, "--include_path"):
        argv += ["--include_path", TASKS_DIR]
    if command == "run" and not _has(argv, "--device") and not _cuda_available():
        argv += ["--device", "cpu"]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *lm_eval_argv(argv)]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else (print(e.code, file=sys.stderr) or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

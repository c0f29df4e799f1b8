"""`titan-rw eval`: lm-evaluation-harness on a titan_rw run or checkpoint, and the paper's table.

    titan-rw eval RUN_DIR|STEP_DIR|FILE --tasks paper|local|TASK,... [--limit N] [--batch-size B]
                  [--output DIR] [--device cuda] [--flavor F] [--tokenizer M] [--step N] [--online]
    titan-rw eval --compare A.json B.json [--names uniform linupper] [--tasks paper]

Prints lm-eval's standard results table (values ± stderr) and the paper-style table; writes
`<output>/results.json` (lm-eval's results JSON; `config.model_args` replays the run with
`titan-rw-lm-eval --model titan_rw --model_args ...`) and `<output>/results.md` (both tables);
default output `<run>/eval/step-N`. Offline by default (HF_HUB_OFFLINE=1,
HF_DATASETS_OFFLINE=1): datasets must already be in HF_HOME, and a missing one is named with the
command that pre-downloads it (exit code 3). `--online` lets lm-eval download.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titan-rw eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="run folder, DCP step-N folder, or consolidated .pt/.safetensors")
    p.add_argument("--tasks", default=None, help="paper | paper_lur | paper_qa | local | comma-separated lm-eval tasks (default: local)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (testing only; <1 = fraction)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", "--output", dest="output", default=None, help="folder for results.json and results.md")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on cuda, fp32 on cpu)")
    p.add_argument("--flavor", default=None, help="model flavor, if the run folder has no run_config.toml")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model, if the run folder has no run_config.toml")
    p.add_argument("--step", type=int, default=None, help="checkpoint step in a run folder (default: latest)")
    p.add_argument("--max-length", type=int, default=None, help="context window (default: the run's seq_len)")
    p.add_argument("--num-fewshot", type=int, default=None, help="override every task's shots")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval stderr bootstrap iterations (0: none)")
    p.add_argument("--include-path", default=None, help="extra folder of lm-eval task YAMLs")
    p.add_argument("--log-samples", action="store_true", help="also write per-sample outputs")
    p.add_argument("--online", action="store_true", help="allow lm-eval/datasets to download (default: offline)")
    p.add_argument("--download", action="store_true",
                   help="only fetch the tasks' datasets into HF_HOME (on a machine with network; no model)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two results.json files (or folders holding one)")
    p.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"), default=None, help="column names for --compare")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC", help="metric shown for a task")
    return p


def _load_results(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    with open(p) as f:
        return json.load(f)


def _with_metrics(specs, overrides: list[str]):
    from titan_rw.eval.presets import TaskSpec

    table = dict(o.split("=", 1) for o in overrides)
    return [TaskSpec(s.task, s.num_fewshot, table.get(s.task, s.metric), s.label, s.group) for s in specs]


def compare_main(a_path: str, b_path: str, names, tasks: str | None, metrics: list[str]) -> int:
    from titan_rw.eval.presets import PRESETS, expand
    from titan_rw.eval.runner import compare_table

    a, b = _load_results(a_path), _load_results(b_path)
    if tasks:
        specs = expand(tasks)
    else:  # what both files hold, paper order first
        have = set(a.get("results", {})) | set(b.get("results", {}))
        ordered = [s.task for s in PRESETS["paper"] + PRESETS["local"] if s.task in have]
        ordered += sorted(have - set(ordered))
        specs = expand(ordered)
    specs = _with_metrics(specs, metrics)
    na, nb = names or (Path(a_path).stem if Path(a_path).is_file() else Path(a_path).name,
                       Path(b_path).stem if Path(b_path).is_file() else Path(b_path).name)
    if na == nb:
        na, nb = "A", "B"
    print(compare_table(a, b, specs, na, nb))
    return 0


def download_main(tasks: str, include_path: str | None) -> int:
    """Load the tasks online once: their datasets land in HF_HOME/datasets for later offline runs."""
    from titan_rw.eval.runner import hf_home, set_offline

    set_offline(False)
    from titan_rw.eval.presets import expand
    from titan_rw.eval.runner import load_tasks, task_manager

    specs = expand(tasks)
    load_tasks(specs, task_manager(include_path, [s.task for s in specs]))
    print(f"titan-rw eval: datasets of {len(specs)} task(s) are in {hf_home()}; offline runs can use them")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:
        return compare_main(args.compare[0], args.compare[1], args.names, args.tasks, args.metric)
    if args.download:
        return download_main(args.tasks or "paper", args.include_path)
    if not args.checkpoint:
        print("titan-rw eval: give a run folder or checkpoint (or --compare A B)", file=sys.stderr)
        return 2

    from titan_rw.eval.runner import set_offline

    set_offline(not args.online)  # before lm_eval / datasets are imported
    from titan_rw.eval.presets import expand
    from titan_rw.eval.runner import MissingDatasetError, evaluate, jsonable, results_table

    specs = _with_metrics(expand(args.tasks or "local", args.num_fewshot), args.metric)
    from titan_rw.eval.adapter import CheckpointError, TitanRWLM

    try:
        # the tasks first: a missing dataset is reported before a big model is loaded
        from titan_rw.eval.runner import check_packages, load_tasks, task_manager

        check_packages(specs)
        objs = load_tasks(specs, task_manager(args.include_path, [s.task for s in specs]))

        t0 = time.perf_counter()
        lm = TitanRWLM(checkpoint=args.checkpoint, flavor=args.flavor, tokenizer=args.tokenizer, step=args.step,
                       max_length=args.max_length, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        print(f"titan-rw eval: {lm.flavor} from {lm.checkpoint.path} on {lm.device}, max_length {lm.max_length} "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate(lm, specs, limit=limit, offline=not args.online, bootstrap_iters=args.bootstrap_iters,
                           log_samples=args.log_samples, include_path=args.include_path, objs=objs)
    except MissingDatasetError as e:
        print(f"titan-rw eval: {e}", file=sys.stderr)
        return 3
    except (CheckpointError, FileNotFoundError, KeyError, ModuleNotFoundError) as e:
        print(f"titan-rw eval: {e}", file=sys.stderr)
        return 2

    ck = lm.checkpoint
    model_args = model_args_string(lm, args)
    out = Path(args.output) if args.output else (
        (ck.run_dir or ck.path.parent) / "eval" / (f"step-{ck.step}" if ck.step is not None else ck.path.stem)
    )
    out.mkdir(parents=True, exist_ok=True)
    data = jsonable(results)
    data.setdefault("config", {}).update(model="titan_rw", model_args=model_args)
    data["titan_rw"] = {"checkpoint": str(ck.path), "step": ck.step, "flavor": lm.flavor, "max_length": lm.max_length,
                        "tasks": [s.task for s in specs], "limit": args.limit, "model_args": model_args}
    with open(out / "results.json", "w") as f:
        json.dump(data, f, indent=2)
    if args.log_samples and results.get("samples"):
        from lm_eval.utils import handle_non_serializable

        for task, samples in results["samples"].items():
            with open(out / f"samples_{task}.jsonl", "w") as f:
                for s in samples:
                    f.write(json.dumps(s, default=handle_non_serializable) + "\n")
    table = results_table(data, specs)
    standard = lm_eval_table(data, args)
    header = f"# Evaluation of {ck.path} ({lm.flavor}, step {ck.step})\n\n"
    with open(out / "results.md", "w") as f:
        f.write(header + table + "\n\n## lm-eval\n\n" + standard + "\n")
    print(standard)
    print(table)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0


def model_args_string(lm, args) -> str:
    """The run as lm-eval's `--model_args` of `titan-rw-lm-eval --model titan_rw` (what reproduces it)."""
    ck = lm.checkpoint
    parts = {"pretrained": str(ck.path), "flavor": lm.flavor, "max_length": lm.max_length,
             "batch_size": args.batch_size, "device": str(lm.device), "dtype": args.dtype}
    if args.tokenizer:
        parts["tokenizer"] = args.tokenizer
    return ",".join(f"{k}={v}" for k, v in parts.items())


def lm_eval_table(data: dict, args) -> str:
    """lm-eval's own results table (values with stderr), under the line lm-eval's CLI prints above it."""
    from lm_eval.utils import make_table

    cfg = data.get("config", {})
    head = (f"{cfg.get('model')} ({cfg.get('model_args')}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
            f"batch_size: {args.batch_size}, bootstrap_iters: {args.bootstrap_iters}")
    parts = [head, make_table(data)]
    if data.get("groups"):
        parts.append(make_table(data, "groups"))
    return "\n".join(parts)


def main() -> None:
    sys.exit(eval_main())


if __name__ == "__main__":
    main()

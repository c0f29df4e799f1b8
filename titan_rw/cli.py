"""`titan-rw`: one entry point for every job of the stack.

    titan-rw train --config train_configs/debug_cpu.toml [--nproc N] [--section.key value ...]
    titan-rw tokenizer train ...      train a sentencepiece model on parquet text
    titan-rw tokenize ...             FineWeb parquet -> datatrove token shards
    titan-rw report RUN_DIR [RUN_DIR ...]   Figure 6 and loss curves as PNG + summary.md
    titan-rw eval RUN_DIR --tasks ...  lm-evaluation-harness on a checkpoint
    titan-rw export RUN_DIR --hf OUT   a Hugging Face transformers Llama folder from a checkpoint
    titan-rw weights ...              show the paper's weights for a batch of losses
    titan-rw experiment toy-regression|duplicates ...

Each subcommand's module is imported only when it runs, so `--help` stays fast and a
missing optional piece names itself instead of breaking the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, function, one-line help); the function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("titan_rw.train", "train_main", "train a Llama with reweighting (torchrun under the hood)"),
    "tokenize": ("titan_rw.data.cli", "tokenize_main", "tokenize parquet text into datatrove token shards"),
    "report": ("titan_rw.report", "report_main", "Figure 6, max weight vs 2/b, loss curves, summary of runs"),
    "eval": ("titan_rw.eval.cli", "eval_main", "evaluate a run or checkpoint with lm-evaluation-harness"),
    "export": ("titan_rw.export", "export_main", "write a Hugging Face transformers Llama folder from a checkpoint"),
    "lm-eval": ("titan_rw.eval.lm_eval_cli", "main", "lm-eval's own CLI with the titan_rw model and local tasks"),
    "weights": ("titan_rw.cli", "weights_main", "print the paper's weights for given losses"),
}
SUBGROUPS: dict[str, dict[str, tuple[str, str, str]]] = {
    "tokenizer": {
        "train": ("titan_rw.data.cli", "tokenizer_train_main", "train a sentencepiece tokenizer on parquet text"),
    },
    "experiment": {
        "toy-regression": (
            "titan_rw.experiments.toy_regression",
            "main",
            "the paper's Appendix B toy regression, all strategies",
        ),
        "duplicates": (
            "titan_rw.experiments.duplicates.cli",
            "main",
            "debug Llama on a corpus with duplicated documents: uniform vs LinUpper",
        ),
    },
}


def weights_main(argv: list[str]) -> int:
    """A quick look at Eq. (4): `titan-rw weights 1.0 2.0 5.0 --strategy linupper -r 1`."""
    import torch

    from titan_rw.reweight import STRATEGIES, max_weight_bound, sample_weights

    p = argparse.ArgumentParser(prog="titan-rw weights", description=weights_main.__doc__)
    p.add_argument("losses", nargs="+", type=float, help="per-sample losses of one batch")
    p.add_argument("--strategy", default="linupper", choices=STRATEGIES,
                   help="upper: the GPT-2 reference code's ramp s = h/2 + 1/2 (fms-fsdp's 'upper' is linupper)")
    p.add_argument("-r", "--temperature", type=float, default=1.0)
    p.add_argument("--cap", type=float, default=None, help="max weight = cap / b (2 = Theorem 1)")
    a = p.parse_args(argv)
    if a.cap is not None and not a.cap >= 1:
        print(f"titan-rw weights: --cap {a.cap} is not allowed: the cap must be >= 1 (max weight = cap / b; "
              "2 guarantees Theorem 1), or left out for no cap", file=sys.stderr)
        return 2
    w = sample_weights(torch.tensor(a.losses), a.strategy, a.temperature, cap=a.cap)
    b = len(a.losses)
    print(f"strategy={a.strategy} r={a.temperature} b={b} bound 2/b={max_weight_bound(b):.6f}")
    for f, wi in zip(a.losses, w.tolist()):
        print(f"  loss {f:10.4f}  weight {wi:.6f}  x b = {wi * b:.3f}")
    return 0


def _run(spec: tuple[str, str, str], argv: list[str]) -> int:
    module, func, _ = spec
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            print(f"titan-rw: this install has no {module} ({e}); reinstall with launch/setup.sh", file=sys.stderr)
            return 2
        raise
    return int(getattr(mod, func)(argv) or 0)


def _usage() -> str:
    lines = ["usage: titan-rw COMMAND [args]  (titan-rw COMMAND --help for its options)", "", "commands:"]
    for name, (_, _, doc) in COMMANDS.items():
        lines.append(f"  {name:26s} {doc}")
    for group, subs in SUBGROUPS.items():
        for name, (_, _, doc) in subs.items():
            lines.append(f"  {group + ' ' + name:26s} {doc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from titan_rw import __version__

        print(f"titan-rw {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in COMMANDS:
        return _run(COMMANDS[cmd], rest)
    if cmd in SUBGROUPS:
        subs = SUBGROUPS[cmd]
        if rest and rest[0] in subs:
            return _run(subs[rest[0]], rest[1:])
        usage = "\n".join([f"usage: titan-rw {cmd} {{{','.join(subs)}}} [args]  "
                           f"(titan-rw {cmd} NAME --help for its options)", ""]
                          + [f"  {name:20s} {doc}" for name, (_, _, doc) in subs.items()])
        if not rest or rest[0] in ("-h", "--help", "help"):
            print(usage)
            return 0
        print(f"titan-rw {cmd}: unknown {rest[0]!r}\n\n{usage}", file=sys.stderr)
        return 2
    print(f"titan-rw: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

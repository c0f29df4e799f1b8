"""`titan-rw tokenizer train` and `titan-rw tokenize` (wired by titan_rw/cli.py)."""

from __future__ import annotations

import argparse
import logging
import sys


def tokenizer_train_main(argv: list[str] | None = None) -> int:
    """Train a sentencepiece tokenizer (identity normalization, byte fallback, exact round trip)
    on the text of parquet files."""
    p = argparse.ArgumentParser(prog="titan-rw tokenizer train", description=tokenizer_train_main.__doc__)
    p.add_argument("--input", required=True, nargs="+", help="parquet file(s), directory, glob or fsspec URL")
    p.add_argument("--output", required=True, help="directory for tokenizer.model (or a path ending in .model)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--text-key", default="text")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="cap on training lines")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import os

    from titan_rw.data.parquet import DataError, ReadStats, read_texts
    from titan_rw.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    prefix = a.output[: -len(".model")] if a.output.endswith(".model") else os.path.join(a.output, "tokenizer")
    stats = ReadStats()
    try:
        model = train_sentencepiece(
            read_texts(a.input, text_key=a.text_key, stats=stats), prefix, vocab_size=a.vocab_size,
            model_type=a.model_type, max_sentences=a.max_sentences, num_threads=a.threads,
        )
    except DataError as e:
        print(f"titan-rw tokenizer train: {e}", file=sys.stderr)
        return 2
    tok = SentencePieceTokenizer(tokenizer_path=str(model))
    print(f"wrote {model} (vocab {tok.get_vocab_size()}, bos {tok.bos_id}, eos {tok.eos_id}); "
          f"{stats.documents} documents read, {stats.skipped} skipped")
    return 0


def tokenize_main(argv: list[str] | None = None) -> int:
    """Tokenize FineWeb-schema parquet (local dir, glob or fsspec path such as
    hf://datasets/HuggingFaceFW/fineweb/sample/10BT) into datatrove token shards with a
    sentencepiece model. Resumable: rerun the same command to finish unfinished tasks."""
    p = argparse.ArgumentParser(prog="titan-rw tokenize", description=tokenize_main.__doc__)
    p.add_argument("--input", required=True, nargs="+", help="parquet file(s), directory, glob or fsspec URL")
    p.add_argument("--output", required=True, help="output directory for shard_XXXXX.ds files")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model or directory (default: the shipped one)")
    p.add_argument("--workers", type=int, default=1, help="local processes")
    p.add_argument("--tasks", type=int, default=None, help="datatrove tasks = shards (default: one per input file)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to each document")
    p.add_argument("--limit", type=int, default=-1, help="documents per task (for a quick trial)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--logging-dir", default=None,
                   help="datatrove logs, stats and completion markers (default OUTPUT/.datatrove)")
    p.add_argument("--slurm", action="store_true", help="submit with datatrove's SlurmPipelineExecutor")
    p.add_argument("--partition", default=None, help="Slurm partition (default: $SLURM_JOB_PARTITION)")
    p.add_argument("--time", default="12:00:00", help="Slurm time limit per task")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-per-cpu-gb", type=int, default=2)
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH option, e.g. account=myproj (repeatable)")
    a = p.parse_args(argv)

    from titan_rw.data import DEFAULT_TOKENIZER
    from titan_rw.data.parquet import DataError
    from titan_rw.data.tokenize import run_tokenize

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    slurm = None
    if a.slurm:
        slurm = {
            "partition": a.partition,
            "time": a.time,
            "cpus_per_task": a.cpus_per_task,
            "mem_per_cpu_gb": a.mem_per_cpu_gb,
            "sbatch_args": dict(kv.split("=", 1) for kv in a.sbatch_arg),
        }
    try:
        shards = run_tokenize(
            a.input if len(a.input) > 1 else a.input[0], a.output, a.tokenizer or DEFAULT_TOKENIZER,
            workers=a.workers, tasks=a.tasks, text_key=a.text_key, add_bos=not a.no_bos,
            slurm=slurm, progress=not a.no_progress, limit=a.limit, logging_dir=a.logging_dir,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"titan-rw tokenize: {e}", file=sys.stderr)
        return 2
    if shards:
        from titan_rw.data.shards import read_metadata

        total = sum(read_metadata(s).token_count for s in shards)
        print(f"{len(shards)} shards, {total} tokens in {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(tokenize_main(sys.argv[1:]))

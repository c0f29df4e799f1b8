"""FineWeb parquet -> datatrove token shards, tokenized with a sentencepiece model.

Pipeline: `CheckedParquetReader` (datatrove's ParquetReader, with per-document UTF-8 / empty checks
and errors naming the file) -> `SentencePieceDocumentTokenizer` (our step: datatrove's own
DocumentTokenizer loads only HF `tokenizer.json`) -> one shard per task:

    OUT/shard_<task>.ds           tokens, little-endian uint16 (vocab <= 65536) or uint32
    OUT/shard_<task>.ds.index     uint64 cumulative document ends
    OUT/shard_<task>.ds.metadata  `<model path>#sha256=<hex16>|<token bytes>`, count, human count
    OUT/shard_<task>.ds.docs      parquet: id, domain per document (provenance for the loader)

Each document is BOS + tokens + EOS. Documents keep their input order: the loader shuffles rows
globally, so datatrove's DocumentTokenizerMerger (a global document shuffle into fewer files) is
not needed, and skipping it keeps `.ds.docs` aligned with the documents.

Resumable: datatrove's LocalPipelineExecutor / SlurmPipelineExecutor record a completion marker per
task under OUT/.datatrove/completions; a rerun redoes only unfinished tasks.
"""

from __future__ import annotations

import logging
import os
import posixpath

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.tokens.tokenizer import TokenizedFile
from datatrove.utils.batching import batched

from titan_rw.data.parquet import DataError, ReadStats, expand_parquet_paths, iter_parquet_documents
from titan_rw.data.shards import DOCS_SUFFIX, ID_ROW_GROUP

logger = logging.getLogger("titan_rw.data")

SHARD_PREFIX = "shard"


class CheckedParquetReader(ParquetReader):
    """ParquetReader that reads text as bytes and decodes strictly: empty and invalid-UTF-8
    documents are skipped, counted (`empty`, `invalid_utf8` in datatrove's stats) and logged;
    unreadable files and a missing text column raise DataError naming the file."""

    name = "📒 Parquet (checked)"

    def __init__(self, *args, domain_key: str = "domain", **kwargs):
        super().__init__(*args, **kwargs)
        self.domain_key = domain_key

    def read_file(self, filepath: str):
        path = self.data_folder.resolve_paths(filepath)
        stats = ReadStats()
        before = (0, 0)
        for text, doc_id, domain, row in iter_parquet_documents(
            path, text_key=self.text_key, id_key=self.id_key, domain_key=self.domain_key,
            batch_size=self.batch_size, stats=stats,
        ):
            now = (stats.empty, stats.invalid_utf8)
            if now != before:
                self.stat_update("empty", value=now[0] - before[0])
                self.stat_update("invalid_utf8", value=now[1] - before[1])
                before = now
            yield Document(text=text, id=doc_id, metadata={"domain": domain, "file_path": path, "row": row})
        if (stats.empty, stats.invalid_utf8) != before:
            self.stat_update("empty", value=stats.empty - before[0])
            self.stat_update("invalid_utf8", value=stats.invalid_utf8 - before[1])
        if stats.skipped:
            logger.warning("%s: skipped %d documents (%d empty, %d invalid UTF-8)", path, stats.skipped,
                           stats.empty, stats.invalid_utf8)


class SentencePieceDocumentTokenizer(PipelineStep):
    """Tokenize documents with a sentencepiece model into one datatrove shard per task."""

    name = "✍️ sentencepiece shards"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        output_folder: DataFolderLike,
        tokenizer_path: str,
        *,
        save_filename: str = SHARD_PREFIX,
        add_bos: bool = True,
        add_eos: bool = True,
        batch_size: int = 1000,
    ):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)
        self.tokenizer_path = tokenizer_path
        self.save_filename = save_filename
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.batch_size = batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from titan_rw.data.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(tokenizer_path=self.tokenizer_path)
        token_size = 2 if tok.get_vocab_size() <= 65536 else 4
        dtype = np.dtype("<u2" if token_size == 2 else "<u4")
        filename = f"{self.save_filename}_{rank:05d}.ds"
        out = TokenizedFile(
            self.output_folder, filename, save_index=True, tokenizer_name_or_path=tok.fingerprint,
            save_final_metadata=True, token_size=token_size,
        )
        ids: list[str] = []
        domains: list[str] = []
        for batch in batched(data, self.batch_size):
            with self.track_time(unit="batch"):
                encoded = tok.encode_batch([d.text for d in batch], add_bos=self.add_bos, add_eos=self.add_eos)
                lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
                flat = np.fromiter((t for e in encoded for t in e), dtype=dtype, count=int(lengths.sum()))
                out.write_bytes(flat.tobytes(), doc_ends=np.cumsum(lengths).tolist())
                for d in batch:
                    ids.append(str(d.id))
                    domains.append(str(d.metadata.get("domain") or ""))
                self.stat_update("documents", value=len(batch))
                self.stat_update("tokens", value=int(lengths.sum()))
        # provenance sidecar first, metadata (written by close) last: metadata marks a whole shard
        table = pa.table({"id": pa.array(ids, pa.string()), "domain": pa.array(domains, pa.string())})
        with self.output_folder.open(filename + DOCS_SUFFIX, "wb") as f:
            pq.write_table(table, f, row_group_size=ID_ROW_GROUP, compression="zstd")
        out.close()
        if not ids:
            logger.warning("task %d: no documents; wrote an empty shard %s", rank, filename)
        return
        yield  # a generator step that consumes the pipeline


def _common_root(paths: list[str]) -> tuple[str, list[str]]:
    if "://" in paths[0]:
        proto = paths[0].split("://", 1)[0] + "://"
        bare = [p.split("://", 1)[1] for p in paths]
        root = posixpath.commonpath([posixpath.dirname(p) for p in bare])
        return proto + root, [posixpath.relpath(p, root) for p in bare]
    absd = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absd])
    return root, [os.path.relpath(p, root) for p in absd]


def precheck_inputs(paths: list[str], text_key: str = "text") -> None:
    """Open every file's footer: unreadable parquet or a missing text column fails before any work."""
    from titan_rw.data.parquet import check_columns, open_parquet

    for p in paths:
        check_columns(open_parquet(p), p, text_key)


def build_pipeline(input_spec, output: str, tokenizer_path: str, *, text_key: str = "text",
                   add_bos: bool = True, add_eos: bool = True, progress: bool = True,
                   limit: int = -1, logging_dir: str | None = None) -> tuple[list, list[str]]:
    paths = expand_parquet_paths(input_spec)
    root, rel = _common_root(paths)
    if "://" in output:
        raise ValueError(f"--output {output}: must be a local (or mounted shared) directory")
    os.makedirs(output, exist_ok=True)
    paths_file = os.path.join(logging_dir or _work_dir(output), "input_paths.txt")
    os.makedirs(os.path.dirname(paths_file), exist_ok=True)
    with open(paths_file, "w") as f:
        f.write("\n".join(rel) + "\n")
    pipeline = [
        CheckedParquetReader(root, paths_file=paths_file, text_key=text_key, file_progress=progress,
                             doc_progress=progress, limit=limit),
        SentencePieceDocumentTokenizer(output, os.path.abspath(tokenizer_path), add_bos=add_bos, add_eos=add_eos),
    ]
    return pipeline, paths


def _work_dir(output: str) -> str:
    return os.path.join(output, ".datatrove")


def run_tokenize(
    input_spec,
    output: str,
    tokenizer_path: str,
    *,
    workers: int = 1,
    tasks: int | None = None,
    text_key: str = "text",
    add_bos: bool = True,
    add_eos: bool = True,
    slurm: dict | None = None,
    progress: bool = True,
    precheck: bool = True,
    limit: int = -1,
    logging_dir: str | None = None,
) -> list[str]:
    """Tokenize parquet into shards under `output`; returns the shard paths (local runs).

    tasks: number of shards / datatrove tasks (default: one per input file, at most 1 per file
    is useful). slurm: dict of SlurmPipelineExecutor kwargs (partition, time, ...) to submit
    instead of running locally (partition defaults to $SLURM_JOB_PARTITION inside an allocation).
    logging_dir: datatrove's logs, stats and completion markers (default OUTPUT/.datatrove).
    """
    from titan_rw.data.tokenizer import resolve_model_path

    tokenizer_path = str(resolve_model_path(tokenizer_path))
    pipeline, paths = build_pipeline(input_spec, output, tokenizer_path, text_key=text_key,
                                     add_bos=add_bos, add_eos=add_eos, progress=progress, limit=limit,
                                     logging_dir=logging_dir)
    if precheck:
        precheck_inputs(paths, text_key)
    n_tasks = tasks or len(paths)
    logging_dir = logging_dir or _work_dir(output)
    if slurm is not None:
        from datatrove.executor import SlurmPipelineExecutor

        kw = dict(slurm)
        kw.setdefault("job_name", "titan_rw_tokenize")
        kw.setdefault("time", "12:00:00")
        if not kw.get("partition"):
            kw["partition"] = os.environ.get("SLURM_JOB_PARTITION")
        if not kw.get("partition"):
            raise ValueError("--slurm needs --partition (or run inside a Slurm allocation)")
        if os.environ.get("VIRTUAL_ENV") and "condaenv" not in kw:
            kw.setdefault("venv_path", os.path.join(os.environ["VIRTUAL_ENV"], "bin", "activate"))
        ex = SlurmPipelineExecutor(pipeline=pipeline, tasks=n_tasks, logging_dir=logging_dir, **kw)
        ex.run()
        return []
    from datatrove.executor import LocalPipelineExecutor

    ex = LocalPipelineExecutor(pipeline=pipeline, tasks=n_tasks, workers=workers, logging_dir=logging_dir,
                               skip_completed=True)
    ex.run()
    return sorted(
        os.path.join(output, f) for f in os.listdir(output) if f.startswith(SHARD_PREFIX) and f.endswith(".ds")
    )


__all__ = ["CheckedParquetReader", "SentencePieceDocumentTokenizer", "run_tokenize", "build_pipeline", "DataError"]

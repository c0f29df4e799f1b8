"""Reading FineWeb-schema parquet: path expansion (local dir, glob, fsspec URL) and checked
document iteration.

Bad input policy (each case has a test):
  - unreadable / truncated parquet, missing text column, empty path set -> `DataError` naming the file;
  - every text of a dataset null (or a text column of type null) -> `DataError` before the model is
    built (`null_text_rows`, from the footer's statistics, for the preflight);
  - an empty (or whitespace-only) document, or one whose text is not valid UTF-8 -> skipped and
    counted in `ReadStats` (the first examples with file and row); the reader's caller logs one
    count line per dataset, never one per document.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

# pyarrow is imported where parquet is read (a run on token shards or the embedded corpus, e.g. the
# GPU check's lean environment, does not need it)

logger = logging.getLogger("titan_rw.data")


class DataError(ValueError):
    """Bad input data; the message names the offending file."""


MAX_SKIPPED_EXAMPLES = 20  # examples kept in ReadStats.skipped_examples


@dataclass
class ReadStats:
    documents: int = 0
    empty: int = 0
    invalid_utf8: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.skipped_examples) < MAX_SKIPPED_EXAMPLES:
            self.skipped_examples.append(f"{kind}: {where}")
        logger.debug("skipping %s document at %s", kind.replace("_", " "), where)

    @property
    def skipped(self) -> int:
        return self.empty + self.invalid_utf8


def is_remote(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def expand_parquet_paths(spec: str | os.PathLike | list) -> list[str]:
    """Sorted parquet files named by a file, a directory (recursive), a glob, or an fsspec URL
    (`hf://datasets/HuggingFaceFW/fineweb/sample/10BT`), or a list of those."""
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(expand_parquet_paths(s))
        return out
    spec = os.fspath(spec)
    if is_remote(spec):
        import fsspec

        fs, root = fsspec.core.url_to_fs(spec)
        proto = spec.split("://", 1)[0]
        if any(c in root for c in "*?["):
            found = fs.glob(root)
        elif fs.isdir(root):
            found = fs.find(root)
        else:
            found = [root]
        files = sorted(f for f in found if f.endswith(".parquet"))
        if not files:
            raise DataError(f"{spec}: no .parquet files found")
        return [f"{proto}://{f}" for f in files]
    spec = spec.removeprefix("file://")
    import glob

    if any(c in spec for c in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(spec):
        files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if f.endswith(".parquet")
        )
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise DataError(f"{spec}: no such file or directory")
    if not files:
        raise DataError(f"{spec}: no .parquet files found")
    return files


def open_parquet(path: str) -> pq.ParquetFile:
    """Open and validate the footer; DataError naming the file if it is not readable parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if is_remote(path):
            import fsspec

            f = fsspec.open(path, "rb").open()
            return pq.ParquetFile(f)
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file (truncated or corrupt?): {e}") from e


def check_columns(pf: pq.ParquetFile, path: str, text_key: str = "text") -> None:
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(f"{path}: no '{text_key}' column (columns: {names})")


def null_text_rows(pf: pq.ParquetFile, path: str, text_key: str = "text") -> int | None:
    """How many rows of the file have a null text, from the footer alone (no data read): every row
    when the column's type is null, else the row groups' null counts; None when a row group has
    no statistics. DataError when the column is neither string nor binary."""
    import pyarrow as pa

    tp = pf.schema_arrow.field(text_key).type
    if pa.types.is_null(tp):
        return pf.metadata.num_rows
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_binary(tp)
            or pa.types.is_large_binary(tp)):
        raise DataError(f"{path}: column '{text_key}' has type {tp}, expected string")
    md = pf.metadata
    cols = [i for i in range(md.num_columns) if md.schema.column(i).path == text_key]
    if len(cols) != 1:
        return None
    nulls = 0
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(cols[0]).statistics
        if st is None or not st.has_null_count:
            return None
        nulls += st.null_count
    return nulls


def iter_parquet_documents(
    path: str,
    *,
    text_key: str = "text",
    id_key: str = "id",
    domain_key: str = "domain",
    batch_size: int = 512,
    stats: ReadStats | None = None,
    default_domain: str | None = None,
) -> Iterator[tuple[str, str, str, int]]:
    """Yield (text, id, domain, row) for every usable document of one parquet file.

    The text column is read as bytes and decoded strictly, so invalid UTF-8 is caught per
    document (skipped, counted, logged) instead of failing the whole file or passing silently.
    Missing id / domain columns fall back to `<file>#<row>` / `default_domain` (or the file stem).
    """
    import pyarrow as pa

    stats = stats if stats is not None else ReadStats()
    pf = open_parquet(path)
    check_columns(pf, path, text_key)
    names = pf.schema_arrow.names
    cols = [text_key] + [c for c in (id_key, domain_key) if c in names and c != text_key]
    domain_fallback = default_domain or os.path.splitext(os.path.basename(path))[0]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            texts = batch.column(text_key)
            if not (pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type)):
                if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
                    raise DataError(f"{path}: column '{text_key}' has type {texts.type}, expected string")
                texts = texts.cast(pa.large_binary() if pa.types.is_large_string(texts.type) else pa.binary())
            raw = texts.to_pylist()
            ids = batch.column(id_key).to_pylist() if id_key in cols else [None] * len(raw)
            doms = batch.column(domain_key).to_pylist() if domain_key in cols else [None] * len(raw)
            for b, i, d in zip(raw, ids, doms):
                where = f"{path} row {row}"
                row += 1
                if b is None:
                    stats.skip("empty", where)
                    continue
                try:
                    text = b.decode("utf-8")
                except UnicodeDecodeError as e:
                    stats.skip("invalid_utf8", f"{where} ({e})")
                    continue
                if not text.strip():
                    stats.skip("empty", where)
                    continue
                stats.documents += 1
                yield text, (str(i) if i is not None else f"{path}#{row - 1}"), (d or domain_fallback), row - 1
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: failed while reading row {row} (truncated or corrupt?): {e}") from e


def read_texts(spec, *, text_key: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    for path in expand_parquet_paths(spec):
        for text, _, _, _ in iter_parquet_documents(path, text_key=text_key, stats=stats):
            yield text

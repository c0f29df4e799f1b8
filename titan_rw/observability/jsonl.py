"""metrics.jsonl and samples.jsonl: the one place of their format, written (`JsonlSink`) and read
back (`read_metrics`, `read_samples`).

One JSON object per line, written whole with its newline and flushed at every log interval; fsync'ed
before a checkpoint that covers the rows (`sync`). Both files survive tears (docs/resuming.md "Torn
lines, full disk"): before the first append a torn last line (the half row a kill or a full disk
leaves) is cut away (`cut_torn_tail`); the readers ignore a torn last line. A write that fails (no
space left, quota, read-only) is one line, `write_failure`, and the run stops on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from titan_rw.observability.names import METRICS_FILE, SAMPLES_FILE
from titan_rw.observability.rows import Interval

_log = logging.getLogger()  # TorchTitan's logger (the root logger): the console lines of the run


class JsonlSink:
    def __init__(self, metrics_path: str, samples_path: str):
        self.metrics_path, self.samples_path = metrics_path, samples_path
        self._fh = self._samples_fh = None
        cut = {p: cut_torn_tail(p) for p in (metrics_path, samples_path)}
        if any(cut.values()):
            _log.warning("titan_rw logging: cut a torn last line (a run killed mid-write) before appending: "
                         + ", ".join(f"{os.path.basename(p)} {n} bytes" for p, n in cut.items() if n))

    def write(self, iv: Interval) -> None:
        if self._fh is None:
            self._fh = open(self.metrics_path, "a")
        for r in iv.rows:
            self._fh.write(json.dumps(r) + "\n")
        self._fh.flush()
        if iv.samples:
            if self._samples_fh is None:
                self._samples_fh = open(self.samples_path, "a")
            for s in iv.samples:
                self._samples_fh.write(json.dumps(s) + "\n")
            self._samples_fh.flush()

    def sync(self) -> None:
        for fh in (self._fh, self._samples_fh):
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())

    def close(self) -> None:
        for fh in (self._fh, self._samples_fh):
            if fh is not None:
                fh.close()
        self._fh = self._samples_fh = None

    def abandon(self) -> None:
        """After a failed write: close the files quietly (their buffers would fail again)."""
        for fh in (self._fh, self._samples_fh):
            if fh is not None:
                try:
                    fh.close()
                except OSError:
                    pass
        self._fh = self._samples_fh = None


def cut_torn_tail(path: str) -> int:
    """Cut a torn last line (bytes after the last newline) from the JSONL file `path`; the bytes
    cut (0 when the file ends with a newline or does not exist). A row is written whole with its
    newline, so bytes after the last one are a row cut short by a kill or a full disk."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        end, chunk = size, 1 << 16
        while end > 0:
            start = max(0, end - chunk)
            fh.seek(start)
            buf = fh.read(end - start)
            nl = buf.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        return size - keep


_WRITE_ERRORS = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded",
                 "EROFS": "read-only file system", "EACCES": "permission denied"}


def write_failure(e: OSError, path: str, step: int | None) -> str:
    """The one line for a metrics file that could not be written (what, where, what to do)."""
    import errno as _errno

    what = next((v for k, v in _WRITE_ERRORS.items() if e.errno == getattr(_errno, k, None)), None)
    what = what or f"{e.strerror or type(e).__name__} (errno {e.errno})"
    where = getattr(e, "filename", None) or path
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
        free = f"; {st.f_bavail * st.f_frsize} bytes free there"
    except OSError:
        free = ""
    at = f" at step {step}" if step is not None else ""
    return (f"titan_rw logging: {what} while writing {where}{at}{free}; the run stopped without writing "
            f"another checkpoint, so every complete checkpoint and the metrics rows it covers are intact. "
            f"Free space and start the same command again: it resumes from the newest complete checkpoint "
            f"(the torn row is cut on open)")


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` (or a path to the file), sorted by step.

    A step logged twice (a run resumed from an earlier checkpoint) keeps its last row. A truncated
    last line (a run killed mid-write) is ignored; any other bad line raises with its number."""
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a titan_rw run folder?)")
    with open(path) as fh:
        lines = fh.read().splitlines()
    by_step: dict[int, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{n}: expected a JSON object with a 'step' field")
        by_step[int(row["step"])] = row
    if not by_step:
        raise ValueError(f"{path}: empty metrics file (no step was logged yet)")
    return [by_step[s] for s in sorted(by_step)]


def read_samples(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, SAMPLES_FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def finite(x: Any) -> bool:
    """A logged number that is neither NaN nor infinite (nor a bool, nor None)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

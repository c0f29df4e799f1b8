"""`ResumableCheckpointManager`: TorchTitan 0.3.0's DCP `CheckpointManager`, resuming from the
newest *complete and readable* checkpoint.

What TorchTitan guarantees (verified in 0.3.0 / torch 2.13): a step folder counts as a checkpoint
only when it holds DCP's `.metadata`; DCP's `FileSystemWriter.finish` writes that file last, on
the coordinator rank, after every rank's data files were written (fsync'ed), to a temp name and
renamed into place. So a save cut off by a crash leaves no `.metadata` and TorchTitan already skips
that folder. It does not detect a checkpoint damaged *after* it was written (a data file deleted
or truncated, a half-finished purge, a disk that lost blocks), and it crashes on load instead.

This manager adds, on automatic resume (`load_step = -1`):
1. a structural check of each candidate, newest first: `.metadata` unpickles and every data file
   it references exists and is long enough for every (offset, length) recorded in it;
2. a fallback when DCP still fails to read a candidate (a collective error, on every rank): the
   next older one is tried. Every tensor and stateful object is loaded again from the older
   checkpoint, so nothing of the failed attempt survives;
3. ONE warning line naming each skipped folder (and why) and the one loaded;
4. before writing `step-N` into a folder that already exists (a run resumed from an older
   checkpoint redoes steps), rank 0 removes it, so a crash mid-save can never leave the old
   `.metadata` next to new data files;
5. `save_now(step)`: a full checkpoint outside the interval (pre-emption signal, too many
   skipped steps), waited for (async modes included) before returning.

Bit rot inside a data file of the right length is not detected (DCP stores no checksums).
Rank 0 decides which checkpoint to load and broadcasts it, so all ranks agree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.tools import filesystem
from torchtitan.tools.logging import logger

_STEP = re.compile(r"^step-(\d+)$")


def check_checkpoint(path: str) -> str | None:
    """None when `path` is a structurally complete DCP checkpoint, else the reason it is not."""
    meta = os.path.join(path, ".metadata")
    if not os.path.isfile(meta):
        return "no .metadata (save did not finish)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read means unusable
        return f".metadata unreadable ({type(e).__name__}: {e})"
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        end = int(info.offset) + int(info.length)
        need[rel] = max(need.get(rel, 0), end)
    for rel, end in sorted(need.items()):
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            return f"data file {rel} missing"
        size = os.path.getsize(f)
        if size < end:
            return f"data file {rel} truncated ({size} bytes, the metadata needs {end})"
    return None


class ResumableCheckpointManager(CheckpointManager):
    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    def __init__(self, config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self._bad: dict[int, str] = {}  # step -> why it was skipped
        self._force = False
        self.last_saved_step = -1
        self.loaded_step = -1

    # ------------------------------------------------------------------ choosing what to load
    def _steps(self) -> list[int]:
        if not filesystem.isdir(self.folder):
            return []
        out = []
        for name in filesystem.listdir(self.folder):
            m = _STEP.match(os.path.basename(name.rstrip("/")))
            if m:
                out.append(int(m.group(1)))
        return sorted(out, reverse=True)

    def _find_load_step(self, folder: str = "") -> int:
        if folder and folder != self.folder:
            return super()._find_load_step(folder)
        choice = -1
        if not dist.is_initialized() or dist.get_rank() == 0:
            for step in self._steps():
                if step in self._bad:
                    continue
                path = self._create_checkpoint_id(step)
                why = None if filesystem.is_remote(path) else check_checkpoint(path)
                if why is None:
                    if filesystem.is_remote(path) and not filesystem.isfile(filesystem.join(path, ".metadata")):
                        why = "no .metadata (save did not finish)"
                    else:
                        choice = step
                        break
                self._bad[step] = why
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [choice, self._bad]
            dist.broadcast_object_list(box, src=0)
            choice, self._bad = box
        return choice

    def _load(self, step: int = -1) -> bool:
        if step != -1:
            ok = super()._load(step)
            self.loaded_step = step if ok else -1
            return ok
        while True:
            found = self._find_load_step()
            try:
                ok = super()._load(-1)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises on every rank alike
                if found < 0:
                    raise
                self._bad[found] = f"load failed ({_first_error(e)})"
                logger.warning(f"titan_rw checkpoint: could not load {self._create_checkpoint_id(found)}; trying an older one")
                continue
            self.loaded_step = found if ok else -1
            self._report(found if ok else -1)
            return ok

    def _report(self, loaded: int) -> None:
        skipped = [(s, why) for s, why in sorted(self._bad.items(), reverse=True) if loaded < 0 or s > loaded]
        if not skipped:
            return
        what = "; ".join(f"skipped {self._create_checkpoint_id(s)}: {why}" for s, why in skipped)
        target = self._create_checkpoint_id(loaded) if loaded >= 0 else "nothing (fresh start)"
        logger.warning(f"titan_rw checkpoint: {what}; loaded {target}")

    # ------------------------------------------------------------------ saving
    def _should_save(self, curr_step: int, last_step: bool = False) -> bool:
        if self._force:
            return self.enable and not self.load_only
        return super()._should_save(curr_step, last_step)

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        if curr_step == self.last_saved_step:
            return False  # this step is on disk already (interval save, then a forced one)
        path = self._create_checkpoint_id(curr_step)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if filesystem.exists(path):
                logger.info(f"titan_rw checkpoint: replacing {path} (a step redone after a resume)")
                filesystem.rmtree(path)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        saved = super()._save(curr_step, last_step)
        if saved:
            self.last_saved_step = curr_step
        return saved

    def save_now(self, curr_step: int) -> bool:
        """A full checkpoint of the current state, whatever the interval; returns once written."""
        if not self.enable or self.load_only:
            return False
        self._force = True
        try:
            saved = self.save(curr_step, last_step=False)
        finally:
            self._force = False
        self.maybe_wait_for_saving()
        return saved or curr_step == self.last_saved_step


def _first_error(e: BaseException) -> str:
    """A one-line reason; for DCP's CheckpointException, the first rank's underlying error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))  # (exception, stack summary)
        inner = inner[0] if isinstance(inner, tuple) and inner else inner
        if isinstance(inner, BaseException):
            e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:300] if text else ''}"

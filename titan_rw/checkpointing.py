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
   skipped steps), waited for (async modes included) before returning;
6. the resume check (docs/resuming.md, "What is checked on resume"): before loading a checkpoint
   of this folder, rank 0 reads the run config saved in it (`run_values`, part of the trainer's
   state) and compares it with this run's. A key of `MUST_MATCH` that differs stops the run
   (`ResumeMismatch`: keys, old and new values, the ways out) before anything is loaded; a key of
   `LOGGED` that differs is logged in one line and the run continues with the new value. A
   mismatch raised while loading (the data loader's own check) stops the run too: fallback to an
   older checkpoint is only for one that is incomplete or unreadable;
7. when checkpoints exist (a step folder with its `.metadata`) and none of them loads, the run
   stops with `ResumeError`: it never starts fresh over them;
8. `before_save(step)` (set by the trainer) runs before a checkpoint is written: the metrics rows
   of every step the checkpoint covers are on disk before the checkpoint is complete;
9. `keep_latest_k` holds after the last step's save too (TorchTitan purges only after interval
   saves, so a run ended with k + 1 checkpoints), and it counts complete checkpoints only (a folder
   with its `.metadata`): an unfinished save never counts, and is removed once a newer complete
   checkpoint exists (TorchTitan counted every step folder, so k crashed saves purged every
   complete one);
10. async saves: a failed background save is reported when it is waited for, naming its own step
   and the newest checkpoint known complete (a save counts as complete once written, not staged);
11. no pickle of ours (docs/design.md §6; docs/resuming.md, "Trust"): our state is stored as JSON in uint8 tensors
   (`json_tensor`), DCP's non-tensor values are read with `torch.load(weights_only=True)`
   (`PlainLoadPlanner`), and the pickles of checkpoints written by earlier versions are read by
   `_PlainUnpickler` (plain containers, numbers, strings, tensors, numpy arrays; nothing else).
   A value that is not plain data stops the resume (`UnsafeCheckpoint`, exit 2) before it runs.

Bit rot inside a data file of the right length is not detected (DCP stores no checksums).
Rank 0 decides which checkpoint to load and broadcasts it, so all ranks agree.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import pickle
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.tools import filesystem
from torchtitan.tools.logging import logger

_STEP = re.compile(r"^step-(\d+)$")

# Keys whose change makes a resume wrong: data repeated or skipped, weights of another shape. The
# run stops before any step (the data loader also checks seq_len, seed and the data's token count).
MUST_MATCH = ("model.flavor", "training.seq_len", "data.seed", "data.shuffle", "data.loader")
# Keys whose change is accepted on resume with one log line (the experiment is not the same).
LOGGED = ("reweight.strategy", "reweight.temperature", "reweight.warmup_temperature", "reweight.warmup_steps",
          "reweight.warmup_mode",
          "reweight.anneal", "reweight.anneal_steps", "reweight.cap", "reweight.scope", "reweight.granularity",
          "reweight.min_document_tokens", "reweight.max_documents_per_row",
          "training.global_batch_size", "training.local_batch_size",
          "optimizer.lr", "optimizer.beta1", "optimizer.beta2", "optimizer.eps", "optimizer.weight_decay",
          "float8.enable", "float8.recipe_name")  # float8 weights are plain tensors: either way loads


class ResumeError(RuntimeError):
    """The run folder holds checkpoints this run must not start over (nothing was run)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (no space left, read-only): one line with the path."""


class UnsafeCheckpoint(ResumeError):
    """A checkpoint value that is not plain data: unpickling it would call code. Nothing of it ran."""


class ResumeMismatch(ResumeError, ValueError):
    """This run's config does not match the checkpoint it would resume from. `changes`:
    [(section.key, checkpoint's value, this run's value)] when known."""

    def __init__(self, message: str, changes: list | None = None):
        super().__init__(message)
        self.changes = changes or []


def config_changes(saved: dict, current: dict, keys) -> list[tuple[str, Any, Any]]:
    """[(section.key, checkpoint's value, this run's value)] for the keys of `keys` that differ."""
    out = []
    for name in keys:
        section, key = name.split(".", 1)
        if key not in (saved or {}).get(section, {}):
            continue  # not recorded by the run that saved it
        old, new = saved[section][key], (current or {}).get(section, {}).get(key)
        if old != new:
            out.append((name, old, new))
    return out


def _fmt(changes) -> str:
    return "; ".join(f"{k} was {old!r}, is now {new!r}" for k, old, new in changes)


def mismatch_message(path: str, changes) -> str:
    return (
        f"titan_rw: this run's config does not match the checkpoint {path}: {_fmt(changes)}. "
        "Resuming would repeat or skip data or load weights of another shape, so nothing was run: no "
        "checkpoint, metrics row or run config was changed. Either restore these values (the folder's run_config.toml "
        "holds the config of the run that saved it), or start a new run in a new --job.dump_folder; to start "
        f"that run over from these weights only (step 0: new optimizer, data order and schedules) add "
        f"--checkpoint.initial_load_path {path} --checkpoint.initial_load_model_only true"
    )


def unsafe_message(path: str, e: UnsafeCheckpoint) -> UnsafeCheckpoint:
    """The one line for a checkpoint value that is not plain data (`e` says which and why)."""
    if getattr(e, "path", None):
        return e
    out = UnsafeCheckpoint(
        f"titan_rw checkpoint: refusing to load {path}: {e}; nothing from it was run. This version "
        "stores its own state as tensors and JSON, and reads older checkpoints' pickles as plain data only, "
        "so this checkpoint was not written by titan_rw as it is (docs/resuming.md, \"Trust\"). Move that "
        "step folder away to resume from the one before, or start a new run in a new --job.dump_folder"
    )
    out.path = path
    return out


def read_run_values(path: str) -> dict | None:
    """The run config stored in checkpoint `path` by `ReweightTrainer.state_dict` (None: not there or
    unreadable). Reads that one value through DCP (no process group), without loading anything else."""
    import torch.distributed.checkpoint as dcp

    box = {"train_state": {"titan_rw": json_tensor(None)}}  # sized to the saved value by the planner
    try:
        dcp.load(box, checkpoint_id=path, planner=PlainLoadPlanner(), no_dist=True)
        extra = load_plain(box["train_state"]["titan_rw"], "train_state.titan_rw")
    except (Exception, CheckpointException):  # noqa: BLE001 - unreadable or unsafe: the real load decides
        return None
    return extra.get("run_values") if isinstance(extra, dict) else None


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
    if not isinstance(md, Metadata):
        return f".metadata holds a {type(md).__name__}, not DCP's Metadata"
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
        self.last_saved_step = -1  # staged or written (async: the write may still be running)
        self.complete_step = -1  # the newest save of this process known written (.metadata on disk)
        self.loaded_step = -1
        self.run_values: dict | None = None  # this run's config (set by the trainer): the resume check
        self.before_save: Callable[[int], None] | None = None  # the trainer's metrics flush
        self._changes: dict[int, list] = {}  # step -> LOGGED keys changed since that checkpoint

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

    def _is_rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def _agree(self, box: list) -> list:
        """Rank 0's values on every rank."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box

    def _check_config(self, step: int) -> str | None:
        """Rank 0: the mismatch message for checkpoint `step` (None: none); records its LOGGED changes."""
        if not self.run_values:
            return None
        path = self._create_checkpoint_id(step)
        saved = None if filesystem.is_remote(path) or not os.path.isdir(path) else read_run_values(path)
        if saved is None:
            return None
        # both as JSON stores them (tuples are lists), whatever the checkpoint's format
        saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(self.run_values))
        bad = config_changes(saved, current, MUST_MATCH)
        if bad:
            return mismatch_message(path, bad)
        self._changes[step] = config_changes(saved, current, LOGGED)
        return None

    def _find_load_step(self, folder: str = "") -> int:
        if folder and folder != self.folder:
            return super()._find_load_step(folder)
        choice, mismatch = -1, None
        if self._is_rank0():
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
                        mismatch = self._check_config(step)
                        break
                self._bad[step] = why
        choice, self._bad, mismatch, self._changes = self._agree([choice, self._bad, mismatch, self._changes])
        if mismatch:
            raise ResumeMismatch(mismatch)
        return choice

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        """TorchTitan's, with `PlainLoadPlanner`: DCP's non-tensor values read with weights_only=True."""
        if from_hf:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        import torch.distributed.checkpoint as dcp

        try:
            dcp.load(state_dict, checkpoint_id=checkpoint_id, planner=PlainLoadPlanner())
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            inner = _inner(e)
            if isinstance(inner, UnsafeCheckpoint):  # the planner's, or a load_state_dict's (ours)
                raise unsafe_message(checkpoint_id, inner) from None
            raise
        if "model" in self.states:  # TorchTitan's MODEL: the model is flattened into state_dict
            self.states["model"].load_state_dict(state_dict)

    def _load(self, step: int = -1) -> bool:
        if step != -1:
            mismatch = self._check_config(step) if self._is_rank0() else None
            mismatch, self._changes = self._agree([mismatch, self._changes])
            if mismatch:
                raise ResumeMismatch(mismatch)
            try:
                ok = super()._load(step)
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                self._raise_if_mismatch(e, step)
                raise
            self.loaded_step = step if ok else -1
            self._log_changes(self.loaded_step)
            return ok
        while True:
            found = self._find_load_step()
            if found < 0:
                self._refuse_fresh_start()
            try:
                ok = super()._load(-1)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises on every rank alike
                if isinstance(e, UnsafeCheckpoint):
                    raise  # a crafted value: stop, never fall back past it silently
                self._raise_if_mismatch(e, found)
                if found < 0:
                    raise
                self._bad[found] = f"load failed ({_first_error(e)})"
                logger.warning(f"titan_rw checkpoint: could not load {self._create_checkpoint_id(found)}; trying an older one")
                continue
            self.loaded_step = found if ok else -1
            self._report(found if ok else -1)
            self._log_changes(self.loaded_step)
            return ok

    def _raise_if_mismatch(self, e: BaseException, step: int) -> None:
        """A mismatch found while loading (the data loader's check) stops the run: no fallback."""
        inner = _inner(e)
        if isinstance(inner, ResumeMismatch):
            path = self._create_checkpoint_id(step) if step >= 0 else self.folder
            changes = getattr(inner, "changes", None)
            if changes:
                raise ResumeMismatch(mismatch_message(path, changes)) from inner
            raise inner

    def _refuse_fresh_start(self) -> None:
        """Checkpoints exist (with their .metadata) and none loads: stop, never start fresh over them."""
        real = [(s, why) for s, why in sorted(self._bad.items(), reverse=True) if not why.startswith("no .metadata")]
        if not real:
            return
        what = "; ".join(f"{self._create_checkpoint_id(s)}: {why}" for s, why in real)
        raise ResumeError(
            f"titan_rw: {self.folder} holds checkpoints but none of them could be loaded ({what}); "
            "refusing to start a fresh run over them. Repair or move the damaged step folders away, "
            "or start a new run in a new --job.dump_folder"
        )

    def _log_changes(self, step: int) -> None:
        changes = self._changes.get(step) if step >= 0 else None
        if changes and self._is_rank0():
            logger.warning(
                f"titan_rw resume: changed since the run that saved {self._create_checkpoint_id(step)}: "
                f"{_fmt(changes)}; the run continues with the new values"
            )

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
        self.maybe_wait_for_saving()  # the previous async save first: its failure names its own step
        path = self._create_checkpoint_id(curr_step)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if filesystem.exists(path):
                logger.info(f"titan_rw checkpoint: replacing {path} (a step redone after a resume)")
                filesystem.rmtree(path)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if self.before_save is not None:
            self.before_save(curr_step)  # metrics rows of the covered steps on disk first
        self._saving = (curr_step, path)
        try:
            saved = super()._save(curr_step, last_step)
        except CheckpointSaveError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self._raise_if_write_failed(e)
            raise
        if saved:
            self.last_saved_step = curr_step
            if self.save_future is None:  # written (sync, or the last step's save); async: once waited for
                self.complete_step = curr_step
            if last_step and not self.last_save_model_only:  # TorchTitan purges after interval saves only
                self.maybe_wait_for_saving()
                self._purge_stale_checkpoints()
        return saved

    def _wait_for_saving(self) -> None:
        try:
            super()._wait_for_saving()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - an async save failed
            self.save_future = None  # reported once: nothing is pending any more
            self._raise_if_write_failed(e)
            raise
        self.complete_step = max(self.complete_step, getattr(self, "_saving", (-1, ""))[0])

    def _purge_stale_checkpoints(self) -> None:
        """Keep the newest `keep_latest_k` *complete* checkpoints (with their `.metadata`); remove
        older complete ones and every unfinished save older than the newest complete checkpoint. An
        unfinished folder newer than that (an async save still being written, or a crashed save that
        the resumed run will redo) is left alone."""
        if not self._should_purge():
            return
        steps = sorted(self._steps())
        complete = [s for s in steps if filesystem.isfile(filesystem.join(self._create_checkpoint_id(s), ".metadata"))]
        if not complete:
            return
        keep = set(complete[-self.keep_latest_k:])
        for s in steps:
            if s not in keep and s < complete[-1]:
                self.purge_queue.put(self._create_checkpoint_id(s))

    def _raise_if_write_failed(self, e: BaseException) -> None:
        """No space left / a read-only or forbidden folder during a save: one line naming the path."""
        import errno

        step, path = getattr(self, "_saving", (-1, self.folder))
        seen, todo = set(), [_inner(e), e]
        while todo:
            x = todo.pop()
            if x is None or id(x) in seen:
                continue
            seen.add(id(x))
            if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                        errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}[x.errno]
                raise self._save_error(what, step, path, x.filename or path) from x
            todo += [x.__cause__, x.__context__, _inner(x)]
        # DCP's writer often reports a full disk as torch.save's "unexpected pos" RuntimeError, the
        # errno lost: infer it from the space left where the checkpoint goes
        free = _free_bytes(path)
        newest = max(self.complete_step, self.loaded_step)
        need = _tree_bytes(self._create_checkpoint_id(newest)) if newest >= 0 else 0
        if free is not None and free < max(need, 16 << 20):
            detail = f"{free} bytes free there; the save failed with {_first_error(e)}"
            raise self._save_error("no space left on device", step, path, detail) from e

    def _save_error(self, what: str, step: int, path: str, detail: str) -> CheckpointSaveError:
        newest = max(self.complete_step, self.loaded_step)
        prev = self._create_checkpoint_id(newest) if newest >= 0 else None
        return CheckpointSaveError(
            f"titan_rw checkpoint: {what} while saving step {step} to {path} ({detail}); "
            "that folder has no .metadata and is never loaded; the newest complete checkpoint is "
            f"{prev or 'the newest older one in ' + self.folder}. Free space (or lower "
            "checkpoint.keep_latest_k) and start the same command again: it resumes from there"
        )

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


def _free_bytes(path: str) -> int | None:
    """Bytes available to this user on the file system holding `path` (None: remote / unknown)."""
    if filesystem.is_remote(path):
        return None
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _tree_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total


def _inner(e: BaseException) -> BaseException:
    """For DCP's CheckpointException, the first rank's underlying error; else `e`."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))  # (exception, stack summary)
        inner = inner[0] if isinstance(inner, tuple) and inner else inner
        if isinstance(inner, BaseException):
            return inner
    return e


def _first_error(e: BaseException) -> str:
    """A one-line reason; for DCP's CheckpointException, the first rank's underlying error."""
    e = _inner(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:300] if text else ''}"


# ---------------------------------------------------------------------- our state's on-disk format
# docs/resuming.md, "Trust": our values are JSON in uint8 tensors, read back without unpickling.
_JSON_MARK = "_titan_rw_json"  # set on the tensors of `json_tensor`: PlainLoadPlanner sizes them


def json_tensor(obj: Any) -> torch.Tensor:
    """`obj` (dicts, lists, strings, numbers, bools, None) as a uint8 tensor of its UTF-8 JSON. DCP
    stores it as tensor data (no pickle); on load, `PlainLoadPlanner` sizes it to the saved length."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    t = torch.tensor(list(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    setattr(t, _JSON_MARK, True)
    return t


def load_plain(raw: Any, what: str) -> Any:
    """Our saved state back as plain data: a `json_tensor` (this version), the pickled bytes of a
    checkpoint of an earlier version (read with `_PlainUnpickler`: nothing but plain data is
    built), or a value DCP already loaded. `UnsafeCheckpoint` (naming `what`) for anything else."""
    if isinstance(raw, torch.Tensor):
        try:
            return json.loads(raw.cpu().numpy().tobytes().decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise UnsafeCheckpoint(f"{what} is not valid JSON ({type(e).__name__}: {e})") from None
    if isinstance(raw, (bytes, bytearray)):
        try:
            return _PlainUnpickler(io.BytesIO(bytes(raw))).load()
        except UnsafeCheckpoint as e:
            raise UnsafeCheckpoint(f"{what} {e}") from None
        except Exception as e:  # noqa: BLE001 - a damaged or foreign pickle
            raise UnsafeCheckpoint(f"{what} is not a readable pickle of plain data ({type(e).__name__}: {e})") from None
    return raw


def _storage_from_bytes(b: bytes):
    """What pickle.dumps(tensor) nests for the storage (torch.storage._load_from_bytes, which calls
    torch.load(weights_only=False)), read with weights_only=True instead."""
    return torch.load(io.BytesIO(b), weights_only=True)


def _plain_globals() -> dict[tuple[str, str], Any]:
    """The only callables a pickle of an earlier version's state may name: containers, a tensor's
    rebuild (its storage read with weights_only=True) and numpy arrays (np.random.get_state())."""
    reconstruct = np.zeros(1).__reduce__()[0]
    out = {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
           ("builtins", "frozenset"): frozenset, ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
           ("torch.storage", "_load_from_bytes"): _storage_from_bytes, ("numpy", "ndarray"): np.ndarray,
           ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = reconstruct
    return out


class _PlainUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds plain data only: any other global is refused before it is called."""

    _allowed = _plain_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpoint(f"would call {module}.{name}, which is not plain data") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint(f"holds a persistent id ({type(pid).__name__}), which is not plain data")


class PlainLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except: non-tensor values (TorchTitan's step, the optimizer's
    param groups, the bytes of an earlier version's state) are read with torch.load(weights_only=True),
    so loading them calls no code; and each `json_tensor` is resized to its saved length first."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        saved = metadata.state_dict_metadata if metadata is not None else {}
        for fqn, obj in self.state_dict.items():
            md = saved.get(fqn)
            if getattr(obj, _JSON_MARK, False) and isinstance(md, TensorStorageMetadata) and tuple(md.size) != tuple(obj.shape):
                obj.resize_(tuple(md.size))

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            why = f"would call {m.group(1)}" if m else str(e).strip().splitlines()[0][:200]
            raise UnsafeCheckpoint(f"{fqn} {why}, which is not plain data") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _rng_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _rng_tensor(x: Any) -> torch.Tensor:
    """A generator state: a uint8 tensor (earlier versions) or its bytes in base64 (this version)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(list(base64.b64decode(x)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, numpy, python, CUDA when initialized) as plain JSON data,
    for the train state."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st = {"torch": _rng_bytes(torch.get_rng_state()),
          "numpy": [kind, [int(k) for k in key], int(pos), int(has_gauss), float(gauss)],
          "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = _rng_bytes(torch.cuda.get_rng_state())
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore `rng_state()` (also the tuples and tensors an earlier version stored)."""
    torch.set_rng_state(_rng_tensor(st["torch"]))
    kind, key, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = st["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(_rng_tensor(st["cuda"]))

"""One run per folder: the lock file `<dump_folder>/run.lock` and its lease (`[run_lock]`).

The process that owns a run (global rank 0) holds the lock from before anything is built until it
exits; a second run on the same folder finds it and stops (`RunLockBusy`, one line naming the
folder and the holder). The file is the one place of the lock's format: one JSON object, written
whole to a temporary file and published with `os.link` (which fails when the lock exists: the
atomic test-and-set, also on NFS) or `os.replace` (the heartbeat). docs/resuming.md "One run per
folder" is the user's view; docs/design.md §6.

A lock whose holder is gone never blocks a resume. It is stale, and taken over with one log line,
when any of these holds (checked in this order):

1. the file cannot be read as a lock (damaged);
2. it names this host and its pid is not running (a kill -9, a crash, on this node);
3. it names this job at an earlier attempt: the same Slurm job id with a lower
   `SLURM_RESTART_COUNT` (a requeue), or the same torchrun run id with a lower
   `TORCHELASTIC_RESTART_COUNT` (`torchrun --max-restarts`): the scheduler or the launcher
   stopped that attempt's processes before starting this one, on whatever node rank 0 now is;
4. its heartbeat is older than `lease_s` (the holder rewrites it every `heartbeat_s` seconds from
   a daemon thread): a dead node, or any holder on another host that stopped beating.

A pid check alone works on one host only; the heartbeat is what works across the hosts of a
shared filesystem (it assumes their clocks agree to well within `lease_s`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

LOCK_FILE = "run.lock"
_log = logging.getLogger()  # TorchTitan's logger (the root logger): the console lines of the run


class RunLockBusy(Exception):
    """Another live run holds the folder's lock: the message is the one line to print."""


def _attempt_env(env=os.environ) -> dict[str, Any]:
    """Who this process is, for rule 3: the Slurm job and torchrun run, with their attempt counts."""
    def count(name):
        try:
            return int(env.get(name, "0") or 0)
        except ValueError:
            return 0

    return {
        "slurm_job_id": env.get("SLURM_JOB_ID") or None,
        "slurm_restart": count("SLURM_RESTART_COUNT"),
        "torchrun_run_id": env.get("TORCHELASTIC_RUN_ID") or None,
        "torchrun_restart": count("TORCHELASTIC_RESTART_COUNT"),
    }


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(holder: dict) -> str:
    """'host H, pid P, started T' (and its job) for a message."""
    s = f"host {holder.get('host')}, pid {holder.get('pid')}, started {_when(float(holder.get('started', 0)))}"
    if holder.get("slurm_job_id"):
        s += f", Slurm job {holder['slurm_job_id']}"
    return s


def stale_reason(holder: dict | None, me: dict, now: float) -> str | None:
    """Why the lock `holder` (None: unreadable) is stale for the process `me` at time `now`, or
    None when its holder may be alive (the rule of the module docstring)."""
    if holder is None:
        return "the lock file is damaged"
    host, pid = holder["host"], int(holder["pid"])
    if host == me["host"] and pid == me["pid"]:
        return "it is this process's own"
    if host == me["host"] and not _pid_running(pid):
        return f"pid {pid} is not running on {host}"
    if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"] \
            and int(holder.get("slurm_restart", 0)) < me["slurm_restart"]:
        return (f"it is an earlier attempt of this Slurm job {me['slurm_job_id']} "
                f"(restart {holder.get('slurm_restart', 0)}, now {me['slurm_restart']})")
    if me["torchrun_run_id"] and holder.get("torchrun_run_id") == me["torchrun_run_id"] \
            and int(holder.get("torchrun_restart", 0)) < me["torchrun_restart"]:
        return (f"it is an earlier attempt of this torchrun run {me['torchrun_run_id']} "
                f"(restart {holder.get('torchrun_restart', 0)}, now {me['torchrun_restart']})")
    age = now - float(holder["heartbeat"])
    lease = float(holder.get("lease_s", 0) or 0)
    if age > lease:
        return f"its last heartbeat is {age:.0f} s old (lease {lease:g} s)"
    return None


class RunLock:
    @dataclass(kw_only=True, slots=True)
    class Config:
        """`[run_lock]`: one run per dump_folder (docs/resuming.md "One run per folder")."""

        enable: bool = True
        """Hold `<dump_folder>/run.lock` while the run lives; a second run on the folder stops (exit 2)."""
        heartbeat_s: float = 10.0
        """Seconds between rewrites of the lock's heartbeat (a daemon thread of rank 0)."""
        lease_s: float = 60.0
        """A lock whose heartbeat is older than this is stale (its holder is gone) and is taken over."""

        def validate(self) -> None:
            if not self.heartbeat_s > 0:
                raise ValueError(f"run_lock.heartbeat_s must be > 0, got {self.heartbeat_s}")
            if not self.lease_s >= 3 * self.heartbeat_s:
                raise ValueError(f"run_lock.lease_s must be at least 3 x run_lock.heartbeat_s "
                                 f"({3 * self.heartbeat_s:g}), got {self.lease_s}: a live holder would look stale")

        def build(self, dump_folder: str) -> "RunLock":
            return RunLock(self, dump_folder)

    def __init__(self, config: "RunLock.Config", dump_folder: str):
        config.validate()
        self.config = config
        self.folder = dump_folder
        self.path = os.path.join(dump_folder, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.held = False
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # set by the heartbeat when another process took the lock

    # ------------------------------------------------------------------ the file format
    def record(self, now: float | None = None) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                "heartbeat": time.time() if now is None else now, "lease_s": self.config.lease_s,
                **_attempt_env(), "token": self.token}

    @staticmethod
    def read(path: str) -> dict | None:
        """The lock at `path` (None when it is damaged); FileNotFoundError when there is none."""
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            rec = json.loads(raw)
            if isinstance(rec, dict) and all(k in rec for k in ("host", "pid", "started", "heartbeat", "token")):
                float(rec["heartbeat"]), int(rec["pid"]), float(rec["started"])
                return rec
        except (ValueError, TypeError):
            pass
        return None

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.record(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _publish(self) -> bool:
        """Create the lock file if there is none (atomically); False when one exists."""
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create (atomic on local disks)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump(self.record(), fh)
            return True
        finally:
            os.unlink(tmp)

    # ------------------------------------------------------------------ acquire / beat / release
    def acquire(self) -> str | None:
        """Take the lock (and start the heartbeat). Returns the takeover line when a stale lock was
        replaced (also logged), None otherwise; raises `RunLockBusy` when a live run holds it."""
        os.makedirs(self.folder, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), **_attempt_env()}
        note = None
        for _ in range(5):  # a contender's takeover between our steps: look again
            if self._publish():
                self.held = True
                self._start_heartbeat()
                if note:
                    _log.warning(note)
                return note
            try:
                holder = self.read(self.path)
            except FileNotFoundError:
                continue  # released meanwhile
            why = stale_reason(holder, me, time.time())
            if why is None:
                age = time.time() - float(holder["heartbeat"])
                raise RunLockBusy(
                    f"titan_rw: the run folder {self.folder} is in use by another run ({describe(holder)}; "
                    f"heartbeat {max(age, 0):.0f} s ago), so nothing was started. Wait for that run to end or "
                    f"stop it, or use another --job.dump_folder; a lock whose holder is gone is taken over by "
                    f"itself (at most run_lock.lease_s = {float(holder.get('lease_s', 0)):g} s after its last "
                    f"heartbeat; {self.path}, docs/resuming.md \"One run per folder\")")
            # stale: move it aside under our own name, then check it is still the lock we judged
            aside = f"{self.path}.stale.{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            try:
                moved = self.read(aside)
            except FileNotFoundError:
                continue
            if holder is not None and (moved is None or moved.get("token") != holder.get("token")):
                # a contender took the stale lock over first and we moved its fresh one: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                continue
            os.unlink(aside)
            who = describe(holder) if holder is not None else "unreadable"
            note = f"titan_rw run_lock: took over the stale lock of {self.folder} ({who}): {why}"
        raise RunLockBusy(f"titan_rw: could not take the lock {self.path}: other runs keep taking it; "
                          f"make sure only one run uses --job.dump_folder {self.folder}")

    def beat(self) -> bool:
        """Rewrite the heartbeat if the lock is still ours; False (and `lost` set) when it is not."""
        if not self.held or self.lost:
            return False
        try:
            cur = self.read(self.path)
        except FileNotFoundError:
            cur = None
        if cur is None or cur.get("token") != self.token:
            self.lost = (f"titan_rw run_lock: {self.path} no longer names this run "
                         f"({describe(cur) if cur else 'removed or damaged'} holds it): another run may be "
                         f"writing to {self.folder}")
            _log.error(self.lost)
            return False
        os.replace(self._write_tmp(), self.path)
        return True

    def _start_heartbeat(self) -> None:
        def loop():
            while not self._stop.wait(self.config.heartbeat_s):
                try:
                    if not self.beat():
                        return
                except OSError as e:  # a full or unreachable disk: the next beat tries again
                    _log.warning(f"titan_rw run_lock: could not renew {self.path} ({e.strerror or e})")

        self._thread = threading.Thread(target=loop, name="titan_rw-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (every exit path calls it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:  # a heartbeat cut short by a full disk leaves its temporary file
            os.unlink(f"{self.path}.{self.token}.tmp")
        except OSError:
            pass
        if not self.held:
            return
        self.held = False
        try:
            cur = self.read(self.path)
            if cur is not None and cur.get("token") == self.token:
                os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

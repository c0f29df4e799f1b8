"""What the run does about faults: non-finite steps, stop signals, and proof of the rows served.

- `NonFiniteSkipOptimizers`: TorchTitan's optimizers container that skips an update whose gradient
  norm is not finite or whose step had a non-finite per-sample loss, on device, with its counters.
- `StopGuard` (`[fault]`): SIGTERM/SIGUSR1 agreed on by every rank, the consecutive-skip stop,
  `TrainingStopped` with the exit code; the rows audit (`fault.audit_rows`).
See docs/resuming.md for what each fault does to a run.
"""

from __future__ import annotations

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.tools.logging import logger

# Exit code when max_consecutive_skips stops the run.
EXIT_TOO_MANY_SKIPS = 3
# Exit code when rank 0 could not write the metrics (a full disk): the run stops without a checkpoint.
EXIT_WRITE_FAILED = 1
# A signal repeated within this many seconds is the same request: Slurm's scancel / requeue /
# pre-emption signals every process of the job step, and torchrun forwards the same signal to its
# workers, so a rank gets it twice at once. Repeated later, it means "stop now".
SAME_SIGNAL_WINDOW_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """The run stopped early on purpose, after saving a checkpoint (a signal, too many skipped
    steps). `exit_code` is what `python -m titan_rw.train` exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_attempt() -> bool:
    """This process is torchrun's first attempt (not a restart)."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")


def _int0(device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


class NonFiniteSkipOptimizers(OptimizersContainer):
    """TorchTitan's `OptimizersContainer` whose `step_unless_nonfinite` drops the update when the
    gradient norm is not finite or any sample of the step had a non-finite loss (docs/resuming.md,
    "Non-finite values": a non-finite activation reaches every weight gradient through its row,
    x·g with x = NaN, so the step is dropped rather than trusted). Parameters, moments and step
    counts are untouched; the LR and temperature schedules still advance (the data is consumed).

    With fused Adam/AdamW the decision stays on device (torch's fused kernel reads `found_inf`);
    other optimizers need one host read per step. The counters are device int64 scalars."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        device = next(p.device for m in model_parts for p in m.parameters())
        self.skipped_now, self.skipped_total, self.consecutive, self.max_consecutive = (_int0(device) for _ in range(4))
        self.fused = all(
            any(g.get("fused") for g in o.param_groups) and type(o).__name__ in ("Adam", "AdamW")
            for o in self.optimizers
        )
        if not self.fused:
            logger.info("titan_rw: optimizer is not fused Adam/AdamW: a non-finite gradient norm is checked on the host every step")

    def step_unless_nonfinite(self, grad_norm: torch.Tensor, nonfinite_samples: torch.Tensor) -> None:
        ok = torch.isfinite(grad_norm.detach().float().reshape(())) & (nonfinite_samples == 0)
        bad = (~ok).to(torch.int64)
        if self.fused:
            found_inf = bad.float()
            for o in self.optimizers:
                o.found_inf = found_inf  # torch's fused Adam(W) kernel skips the update on device
            try:
                self.step()
            finally:
                for o in self.optimizers:
                    o.found_inf = None
        elif bool(ok):  # host read: one per step (only for non-fused optimizers)
            self.step()
        self.skipped_now = bad
        self.skipped_total = self.skipped_total + bad
        self.consecutive = (self.consecutive + 1) * bad
        self.max_consecutive = torch.maximum(self.max_consecutive, self.consecutive)

    def worst_run_since_last_read(self) -> int:
        """The longest run of consecutive skips since the previous call (one host read)."""
        worst = int(self.max_consecutive)
        self.max_consecutive = self.consecutive.clone()
        return worst

    def skip_state(self) -> dict[str, int]:
        return {"skipped_steps": int(self.skipped_total), "consecutive_skips": int(self.consecutive)}

    def load_skip_state(self, st: dict[str, Any]) -> None:
        self.skipped_total.fill_(int(st["skipped_steps"]))
        self.consecutive.fill_(int(st["consecutive_skips"]))
        self.max_consecutive.fill_(int(st["consecutive_skips"]))


class StopGuard:
    """Stops the run after a checkpoint when a rank got SIGTERM/SIGUSR1 (every rank agrees, every
    `signal_check_interval` steps) or when too many optimizer steps in a row were skipped."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        """`[fault]`: what the trainer does about non-finite values and signals (docs/resuming.md)."""

        max_consecutive_skips: int = 10
        """Stop the run (after a checkpoint) when this many optimizer steps in a row were skipped for a
        non-finite gradient norm or a non-finite per-sample loss; 0: never stop."""
        signal_check_interval: int = 1
        """Steps between the ranks' agreement on a received SIGTERM/SIGUSR1: one all-reduce of an int on
        the default process group (on GPU also a device sync, hence 10 in the GPU configs)."""
        signal_exit_code: int = -1
        """Exit code after the checkpoint that a SIGTERM/SIGUSR1 asked for: -1 = 128 + signal number
        (143 for TERM, 138 for USR1), the shell's convention for "stopped by a signal", which Slurm's
        RequeueExit can match; 0 makes it look like a finished run."""
        audit_rows: bool = False
        """Every rank appends the rows it was served, per step, to <dump_folder>/audit/rank<N>.jsonl
        (dataset, epoch, row per sample) with the weight its loss gave each sample: proof that a
        resumed run neither repeats nor skips data, and of which weights each rank applied."""

        def validate(self) -> None:
            if self.max_consecutive_skips < 0:
                raise ValueError(f"fault.max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")
            if self.signal_check_interval < 1:
                raise ValueError(f"fault.signal_check_interval must be >= 1, got {self.signal_check_interval}")
            if not -1 <= self.signal_exit_code <= 255:
                raise ValueError(f"fault.signal_exit_code must be -1 or 0..255, got {self.signal_exit_code}")

        def build(self, **kwargs) -> "StopGuard":
            return StopGuard(self, **kwargs)

    def __init__(self, config: Config, *, rank: int, world_size: int, device: torch.device):
        config.validate()
        self.config = config
        self.rank, self.world_size, self.device = rank, world_size, device
        self._received = 0
        self._received_at = 0.0
        self._prev_handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self._received == signum:
            if time.monotonic() - self._received_at < SAME_SIGNAL_WINDOW_S:
                return  # one stop request delivered twice: by Slurm to every process of the step and by torchrun
            signal.signal(signum, signal.SIG_DFL)  # asked again later: stop now, without a checkpoint
            os.kill(os.getpid(), signum)
            return
        self._received = signum
        self._received_at = time.monotonic()
        sys.stderr.write(f"[titan_rw] rank {self.rank}: received {signal.Signals(signum).name}; "
                         "will checkpoint and exit after the current step\n")

    def _agree(self, received: int, failed: bool) -> tuple[int, bool]:
        """The largest signal number any rank received, and whether any rank's metrics writer failed.
        The default process group: a new gloo group would be cheaper on GPU, but after a torchrun
        restart its rendezvous can read the previous attempt's addresses from the store."""
        if self.world_size == 1:
            return int(received), failed
        flag = torch.tensor([int(received), int(failed)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        sig, bad = flag.tolist()  # on GPU: a device sync every signal_check_interval steps
        return int(sig), bool(bad)

    def check_before_save(self, step: int, write_failure: str | None) -> None:
        """Before a checkpoint is written (every rank): stop, without it, when a rank's metrics writer
        failed; a checkpoint must never cover steps whose rows are not on disk."""
        _, bad = self._agree(0, write_failure is not None)
        if bad:
            self.stop_write_failed(step, write_failure)

    def stop_write_failed(self, step: int, write_failure: str | None) -> None:
        """Raise `TrainingStopped` (exit 1, no checkpoint): rank 0 carries the one line, others none."""
        raise TrainingStopped(write_failure or "", EXIT_WRITE_FAILED)  # titan_rw.train prints it

    def stop_reason(self, step: int, last_step: int, optimizers, log_step: bool,
                    write_failure: str | None = None) -> tuple[str, int] | None:
        """After each step: why the run must stop now, with its exit code, or None. The skip check
        reads the device counters on log steps only (every rank: the gradient norm is global). A
        failed metrics write (`write_failure`, rank 0) stops every rank here without a checkpoint
        (`TrainingStopped`, exit 1), agreed on with the signals every signal_check_interval steps."""
        if step % self.config.signal_check_interval != 0 and step < last_step:
            sig, bad = 0, False
        else:
            sig, bad = self._agree(self._received, write_failure is not None)
        if bad:
            self.stop_write_failed(step, write_failure)
        reason = None
        n = self.config.max_consecutive_skips
        if n > 0 and log_step and isinstance(optimizers, NonFiniteSkipOptimizers):
            worst = optimizers.worst_run_since_last_read()
            if worst >= n:
                reason = (f"{worst} consecutive optimizer steps skipped for a non-finite gradient norm or loss "
                          f"(fault.max_consecutive_skips = {n}); the model is that of the last good step",
                          EXIT_TOO_MANY_SKIPS)
        if sig and reason is None:
            code = 128 + sig if self.config.signal_exit_code == -1 else self.config.signal_exit_code
            reason = (f"{signal.Signals(sig).name} received", code)
        return reason

    @staticmethod
    def stop(step: int, reason: tuple[str, int], saved_to: str | None) -> None:
        """Log the stop and raise `TrainingStopped` (after the caller saved the checkpoint)."""
        msg, code = reason
        where = saved_to or "no checkpoint (checkpoint.enable is false)"
        full = f"titan_rw: stopping at step {step}: {msg}; saved {where}; exit code {code}"
        logger.error(full) if code == EXIT_TOO_MANY_SKIPS else logger.warning(full)
        raise TrainingStopped(full, code)

    def close(self) -> None:
        for sig, h in self._prev_handlers.items():
            signal.signal(sig, h)
        self._prev_handlers = {}


class RowAudit:
    """`fault.audit_rows`: this rank's served rows and the weight its loss gave each of its samples,
    one JSON line per step, in <dump_folder>/audit/rank<N>.jsonl:
    {"step", "dp_rank", "rows": [[dataset, epoch, row], ...], "weights": [w, ...]} (weights: one per
    sample, micro-batch then row; a row's fragment slots under granularity = "document").

    The weights stay on device: `record` keeps references, `flush` (the trainer calls it on log
    steps, before a checkpoint and at close) moves the pending ones to the host in one transfer and
    writes the lines, so the audit adds no host read to a step and a checkpoint's steps are on disk
    before it is complete."""

    def __init__(self, dump_folder: str, rank: int):
        d = os.path.join(dump_folder, "audit")
        os.makedirs(d, exist_ok=True)
        self._fh = open(os.path.join(d, f"rank{rank}.jsonl"), "a")
        self._pending: list[tuple[int, int, list, torch.Tensor | None]] = []

    @staticmethod
    def rows(provenance: list) -> list:
        return [[p[0].get("dataset"), p[0].get("epoch"), p[0].get("row")] if p else None for p in provenance]

    def record(self, step: int, dp_rank: int, rows: list, weights: torch.Tensor | None = None) -> None:
        self._pending.append((step, dp_rank, rows, None if weights is None else weights.detach().reshape(-1)))

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        dev = [w.float() for *_, w in pending if w is not None]
        flat = torch.cat(dev).cpu().tolist() if dev else []  # the one read of the interval
        off = 0
        for step, dp_rank, rows, w in pending:
            line: dict[str, Any] = {"step": step, "dp_rank": dp_rank, "rows": rows}
            if w is not None:
                line["weights"] = flat[off:off + w.numel()]
                off += w.numel()
            self._fh.write(json.dumps(line) + "\n")
        self._fh.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._fh.close()

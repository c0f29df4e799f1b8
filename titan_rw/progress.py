"""A concise per-interval progress line for long work (training, tokenization, evaluation).

    p = Progress(total=1000, unit="step")
    ...
    print(p.line(step, tokens=n_tokens_so_far, loss=2.31, max_weight=0.017, bound=2 / 128))
    # step 120/1000 (12.0%)  eta 14m05s  4,512 tok/s  loss 2.3100  max_w 0.0170 / 2/b 0.0156 (1.09 ×) !

Rates are measured between calls (the last interval), the ETA from the whole run so far, so
start-up (compile, first batch) inflates neither for long. Pure host arithmetic: never touches a
device tensor, so pass host floats (e.g. the rows `RunLogger.flush` returns).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time


def fmt_duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s; '?' for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def fmt_count(x: float) -> str:
    """Thousands separators below 10M, then 12.3M / 4.5G."""
    if x is None or not math.isfinite(x):
        return "?"
    if abs(x) < 1e7:
        return f"{x:,.0f}"
    for unit, scale in (("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:,.0f}"


class Progress:
    def __init__(self, total: int | None, *, unit: str = "step", start: int = 0, clock=time.perf_counter):
        """`total`: the number of units to do (None when unknown); `start`: units already done
        (resumed run), not counted in the rates."""
        self.total = total
        self.unit = unit
        self.clock = clock
        self.t0 = clock()
        self.start = start
        self._last = (self.t0, start, None)  # (time, done, tokens)

    def eta(self, done: int) -> float | None:
        if self.total is None:
            return None
        dt = self.clock() - self.t0
        if done <= self.start or dt <= 0:
            return None
        rate = (done - self.start) / dt
        return max(self.total - done, 0) / rate

    def line(
        self,
        done: int,
        *,
        tokens: int | None = None,
        tokens_per_sec: float | None = None,
        loss: float | None = None,
        max_weight: float | None = None,
        bound: float | None = None,
        extra: dict[str, float | str] | None = None,
    ) -> str:
        """One line: done/total, ETA, units/s or tokens/s (since the previous call), loss, max
        weight vs its bound (× the bound, '!' when above it) and any extra `name value` pairs.
        `tokens` is the cumulative token count."""
        now = self.clock()
        t_prev, d_prev, tok_prev = self._last
        dt = max(now - t_prev, 1e-9)
        parts = []
        if self.total:
            parts.append(f"{self.unit} {done}/{self.total} ({100.0 * done / self.total:.1f}%)")
        else:
            parts.append(f"{self.unit} {done}")
        parts.append(f"eta {fmt_duration(self.eta(done))}" if self.total else f"elapsed {fmt_duration(now - self.t0)}")
        if tokens_per_sec is not None and math.isfinite(tokens_per_sec):
            parts.append(f"{fmt_count(tokens_per_sec)} tok/s")
        elif tokens is not None and tok_prev is not None:
            parts.append(f"{fmt_count((tokens - tok_prev) / dt)} tok/s")
        elif tokens is not None and done > self.start:
            parts.append(f"{fmt_count(tokens / max(now - self.t0, 1e-9))} tok/s")
        elif done > d_prev:
            parts.append(f"{(done - d_prev) / dt:.2f} {self.unit}/s")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if max_weight is not None:
            s = f"max_w {max_weight:.4g}"
            if bound:
                ratio = max_weight / bound
                s += f" / 2/b {bound:.4g} ({ratio:.2f} ×){' !' if ratio > 1 + 1e-6 else ''}"
            parts.append(s)
        for k, v in (extra or {}).items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        self._last = (now, done, tokens)
        return "  ".join(parts)

    def row_line(self, row: dict, *, tokens: int | None = None) -> str:
        """The line for a metrics.jsonl row (as `RunLogger.flush` returns them)."""
        extra = {k: row[k] for k in ("lr", "grad_norm", "temperature") if row.get(k) is not None}
        if row.get("phase") == "burn-in":  # warmup_mode = "uniform": no r, weights exactly uniform
            extra["weights"] = "uniform burn-in"
        if row.get("bound_violations"):  # groups above their own 2/b (one may not hold the max weight)
            extra["bound_violations"] = row["bound_violations"]
        return self.line(
            row["step"],
            tokens=tokens,
            tokens_per_sec=row.get("tokens_per_sec") if tokens is None else None,
            loss=row.get("loss"),
            max_weight=row.get("max_weight"),
            bound=row.get("max_weight_bound"),
            extra=extra,
        )


# ---------------------------------------------------------------------- a quiet console
# TorchTitan messages that are about GPUs and say nothing true on a CPU run.
CPU_NOISE = (
    "Error running lspci",
    "Peak flops undefined",
    "Peak FLOPS used for computing MFU",
    "memory usage for model: -",
    "CUDA graph capture is only supported",
)
# TorchTitan messages about its own defaults that say nothing about the user's run.
ALWAYS_NOISE = ("initial_load_model_only=True has no effect without an initial_load_path",)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ConsoleFilter(logging.Filter):
    """Drops `CPU_NOISE` on a CPU run; strips ANSI colour codes when the console is not a terminal."""

    def __init__(self, *, cpu: bool, strip_ansi: bool):
        super().__init__()
        self.cpu = cpu
        self.strip_ansi = strip_ansi

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(p in msg for p in ALWAYS_NOISE) or (self.cpu and any(p in msg for p in CPU_NOISE)):
            return False
        if self.strip_ansi and "\x1b[" in msg:
            record.msg, record.args = _ANSI.sub("", msg), None
        return True


def quiet_console(log: logging.Logger, *, cpu: bool, stream=None) -> None:
    """Put a `ConsoleFilter` on the logger (TorchTitan logs through the root logger, also before
    `init_logger`) and its handlers; on a CPU, also silence torch's "DTensor random operators ...
    cpu device mesh" warning. Calling it again adds nothing twice."""
    stream = stream or sys.stdout
    f = ConsoleFilter(cpu=cpu, strip_ansi=not (hasattr(stream, "isatty") and stream.isatty()))
    if not any(isinstance(x, ConsoleFilter) for x in log.filters):
        log.addFilter(f)
    for h in log.handlers:
        if not any(isinstance(x, ConsoleFilter) for x in h.filters):
            h.addFilter(f)
    if cpu:
        import warnings

        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support on cpu")


def run_summary(dump_folder: str, *, steps: int, final: dict | None, checkpoint_folder: str | None,
                tb_dir: str | None, metrics_path: str | None) -> str:
    """What a finished run prints last: final loss, where the outputs are, the next commands."""
    d = dump_folder
    head = f"titan_rw: finished {steps} steps"
    final = final or {}
    if isinstance(final.get("loss"), (int, float)):
        head += f"; final loss {final['loss']:.4f}"
        if isinstance(final.get("weighted_loss"), (int, float)):
            head += f" (weighted {final['weighted_loss']:.4f})"
    if isinstance(final.get("max_weight"), (int, float)) and isinstance(final.get("max_weight_bound"), (int, float)):
        head += f", max weight {final['max_weight']:.4g} vs 2/b {final['max_weight_bound']:.4g}"
    lines = [head]
    lines.append(f"  run folder    {d}")
    if checkpoint_folder and os.path.isdir(checkpoint_folder):
        lines.append(f"  checkpoints   {checkpoint_folder}")
    if metrics_path:
        lines.append(f"  metrics       {metrics_path}")
    if tb_dir:
        lines.append(f"  tensorboard   {tb_dir}")
    lines.append("next:")
    if tb_dir:
        lines.append(f"  tensorboard --logdir {os.path.dirname(tb_dir.rstrip('/'))}")
    lines.append(f"  titan-rw report {d}")
    if checkpoint_folder and os.path.isdir(checkpoint_folder):
        lines.append(f"  titan-rw eval {d} --tasks local")
        lines.append(f"  titan-rw export {d} --hf {os.path.join(d, 'hf')}")
    return "\n".join(lines)

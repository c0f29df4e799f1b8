"""Fault injection for the tests (`[fault_injection]`): real faults on the real code paths.

A non-finite activation inside the model, a NaN gradient, a real signal mid-step, a SIGKILL
after a step, or a rank that hangs after a step (a host lost mid-run). Off by default; the
resolved run config (config.json) lists the section only when one of its knobs is set. The
trainer calls the four hooks below; with every knob off they do nothing (and no forward hook is
registered).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger

from titan_rw.faults import first_attempt


class FaultInjection:
    @dataclass(kw_only=True, slots=True)
    class Config:
        nan_loss_steps: list[int] = field(default_factory=list)
        """At these steps, sample 0 of the first micro-batch on DP rank `rank` gets +inf as its
        token-embedding output: a real non-finite activation through every layer (its loss is NaN)."""
        nan_grad_steps: list[int] = field(default_factory=list)
        """At these steps, one gradient element on DP rank `rank` becomes NaN after backward."""
        rank: int = 0
        """The DP rank the nan_* knobs act on."""
        kill_at_step: int = 0
        """SIGKILL this process after this step (and its checkpoint, if one is due), in the first
        attempt only (TORCHELASTIC_RESTART_COUNT unset or 0); 0: off."""
        hang_at_step: int = 0
        """After this step (and its checkpoint, if one is due) this process stops making progress:
        it sleeps until killed, as a host that hangs or dies (first attempt only); 0: off."""
        kill_rank: int = -1
        """The global rank kill_at_step / hang_at_step / signal_at_step act on; -1: every rank."""
        signal_at_step: int = 0
        """Send SIGUSR1 to this process during this step (first attempt only); 0: off."""

        def used(self) -> bool:
            """Any knob differs from its default."""
            return self != type(self)()

        def build(self, **kwargs) -> "FaultInjection":
            return FaultInjection(self, **kwargs)

    def __init__(self, config: Config, *, model: torch.nn.Module, rank: int, dp_rank: int):
        self.config = config
        self.rank, self.dp_rank = rank, dp_rank
        self._row_now = False  # inject into the micro-batch being run
        self._step_on = False  # nan_loss_steps holds this step (on this DP rank)
        if config.nan_loss_steps:  # the hook exists only when the knob is set
            model.tok_embeddings.register_forward_hook(self._embedding_hook)

    def _rank_matches(self) -> bool:
        return self.config.kill_rank in (-1, self.rank)

    def before_step(self, step: int) -> None:
        c = self.config
        self._step_on = step in c.nan_loss_steps and self.dp_rank == c.rank
        if c.signal_at_step == step and self._rank_matches() and first_attempt():
            os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, mid-step

    def before_forward(self, microbatch: int) -> None:
        self._row_now = self._step_on and microbatch == 0

    def _embedding_hook(self, _module, _args, out):
        """+inf in sample 0's token embeddings, so the non-finite value starts inside the model and
        flows through every layer, as a real overflow would."""
        if not self._row_now:
            return None
        first = (torch.arange(out.shape[0], device=out.device) == 0).view(-1, *([1] * (out.dim() - 1)))
        return torch.where(first, torch.full_like(out, float("inf")), out)

    @torch.no_grad()
    def after_backward(self, step: int, model_parts: list[torch.nn.Module]) -> None:
        if step not in self.config.nan_grad_steps or self.dp_rank != self.config.rank:
            return
        for p in (p for m in model_parts for p in m.parameters()):
            g = p.grad
            if g is None:
                continue
            loc = g.to_local() if isinstance(g, DTensor) else g
            if loc.numel():
                loc.view(-1)[0] = float("nan")
                return

    def after_step(self, step: int) -> None:
        if self.config.hang_at_step == step and self._rank_matches() and first_attempt():
            logger.warning(f"TESTING fault_injection.hang_at_step: rank {self.rank} stops after step {step}")
            sys.stdout.flush()
            sys.stderr.flush()
            while True:
                time.sleep(3600)
        if self.config.kill_at_step == step and self._rank_matches() and first_attempt():
            logger.warning(f"TESTING fault_injection.kill_at_step: SIGKILL of rank {self.rank} after step {step}")
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


"""What the reweighting trainer saves in a checkpoint and restores on resume (docs/resuming.md): its
part of the train state, and the optimizer hyperparameters of this run's config over the loaded ones.
`ReweightTrainer` (titan_rw/trainer.py) inherits it ahead of TorchTitan's `Trainer`."""

from __future__ import annotations

from typing import Any

import torch
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from titan_rw.checkpointing import json_tensor, load_plain, rng_state, set_rng_state


class TrainState:
    """Mixed into `ReweightTrainer`, whose attributes it uses: the checkpointer, optimizers, LR
    schedulers, temperature schedule, run logger and config."""

    def resume(self) -> int:
        """Load the newest complete checkpoint (or `checkpoint.load_step`); the step resumed from.
        The optimizer's hyperparameters are this run's config (docs/resuming.md, "Changed optimizer
        keys"): the checkpoint's param groups would otherwise keep its lr for the first step."""
        configured = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                      for o in self.optimizers.optimizers]
        self.checkpointer.load(step=self.config.checkpoint.load_step)
        self._apply_configured_hyperparameters(configured)
        if self.step:
            logger.info(f"titan_rw: resumed from the checkpoint of step {self.step} "
                        f"(data cursor, optimizer, LR and temperature schedules, RNG restored)")
        self._resumed = True
        return self.step

    def _apply_configured_hyperparameters(self, configured: list[list[dict]]) -> None:
        """Every param group's hyperparameters as this run's optimizer built them, and its lr at the
        loaded schedule position (TorchTitan's LR load recomputes it from this run's base lr)."""
        for o, sched, groups in zip(self.optimizers.optimizers, self.lr_schedulers.schedulers, configured):
            for g, hp, lr in zip(o.param_groups, groups, sched.get_last_lr()):
                g.update({k: v for k, v in hp.items() if k != "lr"})
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """TorchTitan's train state (step, ntokens_seen) + ours as one JSON value in a uint8 tensor
        (`titan_rw.checkpointing.json_tensor`: no pickle; DCP stores it once, any world size loads
        it): the temperature schedule, the RunLogger (rank 0's), the skip counters, the RNG states
        (rank 0's: TorchTitan seeds every DP rank alike) and the run config (the resume check)."""
        sd = Trainer.state_dict(self)
        extra = {
            "temperature_last_step": self.temperature_schedule.last_step,
            "run_logger": self.run_logger.state_dict(),
            **self.optimizers.skip_state(),
            "rng": rng_state(),
            "run_values": self.config.run_values,  # the resume check (titan_rw.checkpointing)
        }
        if self.world_size > 1:  # only rank 0's RunLogger is enabled; one value on every rank
            box = [extra]
            torch.distributed.broadcast_object_list(box, src=0)
            extra = box[0]
        sd["titan_rw"] = json_tensor(extra)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also reads the pickled bytes of checkpoints of earlier versions (version 1), as plain data
        only (`titan_rw.checkpointing.load_plain`)."""
        Trainer.load_state_dict(self, state_dict)
        raw = state_dict.get("titan_rw")
        if raw is not None:
            extra = load_plain(raw, "train_state.titan_rw")
            self.temperature_schedule.last_step = int(extra["temperature_last_step"])
            self.run_logger.load_state_dict(extra["run_logger"])
            self.optimizers.load_skip_state(extra)
            set_rng_state(extra["rng"])
        self.run_logger.resumed_at(self.step)

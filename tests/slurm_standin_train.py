"""A stand-in for `python -m titan_rw.train` with the same run-folder contract, used only by the
test of launch/torchrun_multi.sh alone (tests/test_slurm.py's Slurm jobs run the real trainer).

    torchrun --nproc_per_node=2 tests/slurm_standin_train.py --config X.toml \
        --job.dump_folder RUN --training.steps 20 --checkpoint.interval 5 [--standin.step_seconds 0.2]

Each step: one gloo all_reduce, a sleep, rank 0 appends {"step", "loss", "restart"} to
<dump_folder>/metrics.jsonl. Checkpoints: <dump_folder>/checkpoint/step-N/state.json (written to a
temp dir and renamed; `.metadata` marks it complete, as in DCP), resumed from the newest one at start.

It also implements the pre-emption protocol the Slurm scripts expect from the real trainer:
SIGTERM or SIGUSR1 sets a flag; at the end of each step the ranks agree on it (all_reduce MAX, so
every rank stops at the same step), save a checkpoint of that step and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

_STOP = {"sig": 0}


def _on_signal(signum, _frame):
    _STOP["sig"] = signum  # only a flag: the step loop saves at a step boundary


def _parse(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    it = iter(argv)
    for a in it:
        if a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            out[key] = val if eq else next(it)
    return out


def _latest(ckpt_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in ckpt_dir.glob("step-*") if (p / ".metadata").exists()]
    return max(steps, default=0)


def main() -> int:
    args = _parse(sys.argv[1:])
    run = Path(args.get("job.dump_folder", "runs/standin"))
    steps = int(args.get("training.steps", 10))
    interval = int(args.get("checkpoint.interval", 5))
    enable = args.get("checkpoint.enable", "true").lower() not in ("false", "0")
    step_s = float(args.get("standin.step_seconds", 0.2))
    ckpt_dir = run / args.get("checkpoint.folder", "checkpoint")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGUSR1, _on_signal)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run.mkdir(parents=True, exist_ok=True)

    start = _latest(ckpt_dir) if enable else 0
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if rank == 0:
        print(f"[standin] world {dist.get_world_size()} resume from step {start} restart {restart}", flush=True)

    def save(step: int) -> None:
        dist.barrier()
        if rank == 0:
            tmp = ckpt_dir / f".tmp-step-{step}"
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            (tmp / ".metadata").write_text("stand-in")  # DCP writes .metadata last
            os.replace(tmp, ckpt_dir / f"step-{step}")
            print(f"[standin] saved checkpoint step-{step}", flush=True)
        dist.barrier()

    for step in range(start + 1, steps + 1):
        t = torch.ones(1) * (rank + 1)
        dist.all_reduce(t)
        time.sleep(step_s)
        if rank == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 10.0 / step, "restart": restart}) + "\n")
        stop = torch.tensor([_STOP["sig"]])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if enable and (step % interval == 0 or step == steps):
            save(step)
        elif enable and stop.item():
            save(step)
        if stop.item():
            if rank == 0:
                print(f"[standin] signal {int(stop.item())}: stopped after step {step}", flush=True)
            break
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The loader state through real DCP with gloo process groups: saved by 2 ranks, loaded by 3."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import titan_rw  # noqa: F401
from test_data_helpers import synthetic_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str, ckpt: str, out: str, phase: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from titan_rw.data.loader import TokenDataLoader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = 12 // world
        dl = TokenDataLoader.Config(dataset_path=path, seed=4, check_tokenizer=False).build(
            dp_world_size=world, dp_rank=rank, tokenizer=None, seq_len=16, local_batch_size=B)
        if phase == "save":
            it = iter(dl)
            for _ in range(5):
                next(it)
            dcp.save({"dataloader": dl}, checkpoint_id=ckpt)
        else:
            from titan_rw.checkpointing import PlainLoadPlanner

            # the planner the checkpoint manager loads with: it sizes the JSON state tensor to the saved one
            dcp.load({"dataloader": dl}, checkpoint_id=ckpt, planner=PlainLoadPlanner())
            x, _ = dl.next_batch()
            torch.save(x["input"], os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_dcp_save_on_2_ranks_load_on_3(tmp_path):
    import torch.multiprocessing as mp

    from titan_rw.data.loader import TokenDataLoader

    path, _ = synthetic_dataset(str(tmp_path / "d"), 2, 30, seed=2)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    os.makedirs(out)
    mp.start_processes(_worker, args=(2, _free_port(), path, ckpt, out, "save"), nprocs=2, start_method="fork")
    mp.start_processes(_worker, args=(3, _free_port(), path, ckpt, out, "load"), nprocs=3, start_method="fork")
    ref = TokenDataLoader.Config(dataset_path=path, seed=4, check_tokenizer=False).build(
        dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=16, local_batch_size=12)
    for _ in range(5):
        ref.next_batch()
    x_ref, _ = ref.next_batch()
    got = torch.cat([torch.load(os.path.join(out, f"rank{k}.pt")) for k in range(3)])
    assert torch.equal(got, x_ref["input"])

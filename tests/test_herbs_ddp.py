"""HERBS under DistributedDataParallel (gloo, 2 CPU processes) without ``find_unused_parameters``.

The official code had no multi-GPU path; here every parameter HERBS keeps trainable gets a gradient
each step (the backbone's unused classifier is frozen at build), so plain DDP works.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from coarse2fine.config import HERBSConfig
from coarse2fine.herbs import build_herbs


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from helpers.models import TinyCNN

        torch.manual_seed(0)
        model, objective = build_herbs(TinyCNN(), 5, HERBSConfig(fpn_size=8, lambda_dropped=0.0), input_size=16)
        ddp = DDP(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):  # a parameter without gradient would fail the second step's reduction
            x, y = torch.randn(4, 1, 16, 16, generator=gen), torch.randint(0, 5, (4,), generator=gen)
            loss = objective(ddp(x), y)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(flat, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_stay_in_sync(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(a, b)  # different data per rank, identical weights after the all-reduce

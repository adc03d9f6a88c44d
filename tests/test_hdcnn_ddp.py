"""The HD-CNN pipeline under torchrun: two gloo processes (CPU) on tiny Fashion-MNIST IDX files.

Every training stage runs data-parallel (each rank its own shard, gradients all-reduced), rank 0
alone writes the stage files and evaluates; the other ranks return without a report.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from coarse2fine.config import config_from_dict, to_dict
from coarse2fine.engine.checkpoint import load_checkpoint
from coarse2fine.hierarchy import Hierarchy
from coarse2fine.models import register_model
from coarse2fine.recipes import hdcnn as pipeline
from helpers.hdcnn import TINY_BLOCK, make_cfg, tiny_block_builder


def _worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )

    register_model(TINY_BLOCK, tiny_block_builder, replace=True)  # spawned process: register it again
    real_fit = pipeline.fit

    def recording_fit(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = inspect.signature(real_fit).bind(model, *args, **kwargs).arguments["run"]
        result = real_fit(model, *args, **kwargs)  # the weights each rank trained (before the best is loaded)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(params, Path(out_dir) / f"{run.root.name}.rank{rank}.pt")
        return result

    pipeline.fit = recording_fit
    report = pipeline.run_pipeline(config_from_dict(cfg_dict), progress=False)
    torch.save({"keys": sorted(report)}, Path(out_dir) / f"report.rank{rank}.pt")


@pytest.mark.slow
def test_pipeline_under_two_gloo_processes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "hdcnn.finetune_epochs=2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, to_dict(cfg), str(tmp_path)), nprocs=2, join=True)

    # every stage's weights in sync on both ranks: block, fine components (k*), HD-CNN fine-tuning
    stages = sorted({p.name.split(".rank")[0] for p in tmp_path.glob("*.rank0.pt")} - {"report"})
    assert {"block", "k0", "finetune"} <= set(stages)
    for stage in stages:
        a, b = (torch.load(tmp_path / f"{stage}.rank{r}.pt", weights_only=True) for r in range(2))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), stage
    run = cfg.run_dir
    for stage in ("block", "finetune"):  # trained by both processes, written by rank 0
        assert load_checkpoint(run / stage / "checkpoints" / "last.pt")["world_size"] == 2, stage
    h = Hierarchy.load(run / "hierarchy.json", [str(c) for c in load_checkpoint(run / "block.pt")["classes"]])
    for k in range(h.num_coarse):
        assert (run / "fine" / f"component_{k}.pt").is_file() or len(h.partial_sets[k]) == 1
    # rank 0 evaluated the whole test split; rank 1 returned without a report
    keys0 = torch.load(tmp_path / "report.rank0.pt", weights_only=True)["keys"]
    keys1 = torch.load(tmp_path / "report.rank1.pt", weights_only=True)["keys"]
    assert {"hdcnn", "block", "beta_sweep"} <= set(keys0) and "rank" in keys1 and "hdcnn" not in keys1
    report = json.loads((run / "hdcnn_report.json").read_text())
    assert report["hdcnn"]["num_samples"] == report["block"]["num_samples"] == 60  # every test image once

"""Two gloo processes (CPU) train like one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coarse2fine.engine import load_checkpoint, predict_proba
from helpers.engine import TinyDataset, TinyLoader, comparable, run

HELPERS = Path(__file__).parent / "helpers" / "engine.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(HELPERS),
                    "--run-dir",
                    str(tmp_path / "ddp"),
                    "--epochs",
                    "2",
                    "--batch-size",
                    "16",
                    "--out",
                    str(tmp_path / "out.pt"),
                    "--nan-run-dir",
                    str(tmp_path / "nan"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]

    single, result = run(tmp_path / "single", epochs=2, batch_size=32)  # global batch = 16 x 2
    ranks = [torch.load(tmp_path / f"out.rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in single.state_dict().items():
        for r in ranks:
            assert torch.allclose(r["model"][k], v, atol=1e-5), k
    ddp_hist, ref_hist = ranks[0]["history"], comparable(result.history)
    assert [h["val_top1"] for h in ddp_hist] == [h["val_top1"] for h in ref_hist]
    assert [h["train_top1"] for h in ddp_hist] == [h["train_top1"] for h in ref_hist]
    for a, b in zip(ddp_hist, ref_hist):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)

    # only rank 0 wrote files; the checkpoint holds the unwrapped model (no "module." prefix)
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and set(ckpt["model"]) == set(single.state_dict())
    assert len((tmp_path / "ddp" / "metrics.csv").read_text().splitlines()) == 3

    # predict_proba gathered the uneven shards back into dataset order on both ranks
    odd = TinyLoader(TinyDataset(61, seed=3), 8, shuffle=False, drop_last=False)
    probs, targets = predict_proba(single, odd, device="cpu")
    one, _ = predict_proba(single, TinyLoader(TinyDataset(1, seed=4), 8, shuffle=False, drop_last=False), device="cpu")
    for r in ranks:
        assert np.array_equal(r["targets"].numpy(), targets)
        assert np.allclose(r["probs"].numpy(), probs, atol=1e-4)
        assert r["probs_one"].shape == (1, 4) and np.allclose(r["probs_one"].numpy(), one, atol=1e-4)

    # a checkpoint written by 2 processes resumes in 1 (the model is stored unwrapped)
    _, resumed = run(tmp_path / "ddp", epochs=3, batch_size=32, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["val_top1"] >= 0.9

    # a NaN loss on rank 1 only (loss call 11 = epoch 2, step 4): both ranks skip that step, no hang,
    # and the replicas stay identical
    nan_runs = [torch.load(tmp_path / f"out.nan.rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in nan_runs[0]["model"].items():
        assert torch.equal(v, nan_runs[1]["model"][k]), k
        assert torch.isfinite(v).all()
    assert [h["skipped_steps"] for h in nan_runs[0]["history"]] == [0, 1]

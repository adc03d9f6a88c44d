"""HD-CNN stages survive SIGKILL: a killed `c2f hdcnn fit` re-run with the same command ends where an
uninterrupted run ends (CPU, deterministic), killed inside fine-component pre-training or inside the
global fine-tuning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.hdcnn import write_fashion_mnist


def _command(root: Path, out: Path) -> list[str]:
    sets = [
        "name=k",
        f"out_dir={out}",
        f"data.root={root}",
        "data.val_fraction=0.2",
        "data.batch_size=30",
        "data.pad=0",
        "model.name=vgg_small_bn",
        "schedule.name=constant",
        "optim.lr=0.02",
        "train.threads=1",
        "train.device=cpu",
        "train.amp='off'",
        "train.deterministic=true",
        "hdcnn.num_coarse=3",
        "hdcnn.block_epochs=2",
        "hdcnn.fine_epochs=2",
        "hdcnn.finetune_epochs=2",
        "hdcnn.beta_sweep=[2.0]",
    ]
    cmd = [sys.executable, "-m", "coarse2fine", "hdcnn", "fit", "--config", "configs/hdcnn_fashion_mnist.yaml"]
    for s in sets:
        cmd += ["--set", s]
    return [*cmd, "--quiet"]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "k" / "hdcnn.pt", weights_only=True)
    return ckpt["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Tiny data and the final weights of one uninterrupted run."""
    tmp = tmp_path_factory.mktemp("hdcnn_kill")
    root = write_fashion_mnist(tmp / "fmnist", n_train=150, n_test=40)
    subprocess.run(_command(root, tmp / "a"), cwd=CWD, env=ENV, check=True, capture_output=True)
    return root, _final_weights(tmp / "a")


CWD = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["fine/k*/checkpoints/last.pt", "finetune/checkpoints/last.pt"])
def test_sigkill_during_hdcnn_fit_then_rerun_matches_uninterrupted(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]], trigger: str
) -> None:
    """Killed as soon as a stage has written its first epoch checkpoint (inside that stage, whatever
    the machine's speed), then re-run with the same command."""
    root, expected = reference
    run = tmp_path / "b" / "k"
    proc = subprocess.Popen(
        _command(root, tmp_path / "b"), cwd=CWD, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not any(run.glob(trigger)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, f"the run ended before {trigger} appeared"
    assert not (run / "hdcnn.pt").exists()

    done = subprocess.run(_command(root, tmp_path / "b"), cwd=CWD, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = _final_weights(tmp_path / "b")
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(resumed[name], value), name

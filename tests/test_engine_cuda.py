"""engine.fit on a CUDA GPU: bf16 autocast, fp16 with GradScaler, channels_last, deterministic resume.

Skipped where no GPU is present (CI); run on a GPU machine with
``python -m pytest tests/test_engine_cuda.py -q``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coarse2fine.engine import load_checkpoint, predict_proba
from helpers.engine import STEPS_PER_EPOCH, comparable, make_loaders, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = {"device": "cuda", "threads": None}


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_fit_on_gpu_with_amp_learns(tmp_path: Path, amp: str) -> None:
    model, result = run(tmp_path, epochs=3, amp=amp, channels_last=True, deterministic=False, **GPU)
    assert result.history[-1]["val_top1"] >= 0.9, result.history
    assert next(model.parameters()).is_cuda
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # map_location cpu
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    if amp == "fp16":
        assert ckpt["scaler"]["scale"] > 0  # the GradScaler state is saved
    assert ckpt["global_step"] == 3 * STEPS_PER_EPOCH


def test_gpu_deterministic_resume_matches(tmp_path: Path) -> None:
    ref_model, ref = run(tmp_path / "ref", epochs=3, amp="bf16", deterministic=True, **GPU)

    def crash(i: int) -> None:
        if i == STEPS_PER_EPOCH + 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        run(tmp_path / "b", epochs=3, amp="bf16", deterministic=True, on_batch=crash, **GPU)
    model, result = run(tmp_path / "b", epochs=3, amp="bf16", deterministic=True, resume=True, **GPU)
    for k, v in ref_model.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6, rtol=0), k
    assert comparable(result.history) == comparable(ref.history)


def test_predict_proba_gpu_matches_cpu(tmp_path: Path) -> None:
    model, _ = run(tmp_path, epochs=1, amp="off", deterministic=False, **GPU)
    _, val = make_loaders()
    p_gpu, t_gpu = predict_proba(model, val, device="cuda", amp="off")
    p_cpu, t_cpu = predict_proba(model.cpu(), val, device="cpu", amp="off")
    assert np.array_equal(t_gpu, t_cpu)
    assert np.allclose(p_gpu, p_cpu, atol=1e-4)

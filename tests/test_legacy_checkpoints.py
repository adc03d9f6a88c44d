"""Checkpoints written before the architecture change still load and compute the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coarse2fine.engine.objective import logits_of
from coarse2fine.recipes import load_trained

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
KINDS = {"plain": "VGG", "herbs": "HERBS", "hdcnn": "HDCNN", "plain_pq": "VGG", "hdcnn_pq": "HDCNN"}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_old_layout_checkpoint_loads_with_same_logits(name: str) -> None:
    expected = torch.load(LEGACY / "expected_logits.pt", weights_only=True)
    trained = load_trained(LEGACY / f"{name}.pt")
    assert type(trained.model).__name__ == KINDS[name]
    assert trained.facts.in_chans == 1 and trained.facts.image_size == 28
    with torch.no_grad():
        logits = logits_of(trained.model(expected["input"])).float()
    torch.testing.assert_close(logits, expected[name], rtol=1e-5, atol=1e-5)

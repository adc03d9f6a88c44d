"""HD-CNN loss (METHODS.md §2.3): value by hand and gradient of the consistency term."""

from __future__ import annotations

import pytest
import torch

from coarse2fine.errors import ConfigError
from coarse2fine.hdcnn.objective import HDCNNObjective


def test_loss_value_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    coarse = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    targets = torch.tensor([0, 2])
    t = [0.4, 0.6]
    obj = HDCNNObjective(t, consistency_weight=20.0)
    out = obj({"logits": probs.log(), "coarse_probs": coarse}, targets)
    nll = -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.8))) / 2
    mean_b = [0.6, 0.4]
    consistency = 0.5 * ((0.4 - mean_b[0]) ** 2 + (0.6 - mean_b[1]) ** 2)
    assert out["nll"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert out["consistency"].item() == pytest.approx(consistency, rel=1e-6)
    assert out["loss"].item() == pytest.approx(nll.item() + 20.0 * consistency, rel=1e-6)
    zero = HDCNNObjective(t, consistency_weight=0.0)({"logits": probs.log(), "coarse_probs": coarse}, targets)
    assert zero["loss"].item() == pytest.approx(nll.item(), rel=1e-6)


def test_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    obj = HDCNNObjective(torch.tensor([0.2, 0.5, 0.3]), consistency_weight=5.0).double()
    targets = torch.tensor([0, 3, 1, 2])

    def energy(logit_f: torch.Tensor, logit_c: torch.Tensor) -> torch.Tensor:
        outputs = {"logits": torch.log_softmax(logit_f, 1), "coarse_probs": torch.softmax(logit_c, 1)}
        return obj(outputs, targets)["loss"]

    lf = torch.randn(4, 4, dtype=torch.double, requires_grad=True)
    lc = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(energy, (lf, lc))
    # the consistency gradient w.r.t. B_ik by hand: -lambda (t_k - mean_i B_ik) / n
    coarse = torch.softmax(torch.randn(4, 3, dtype=torch.double), 1).requires_grad_(True)
    out = obj({"logits": torch.zeros(4, 4, dtype=torch.double), "coarse_probs": coarse}, targets)
    out["loss"].backward()
    expected = -5.0 * (obj.coarse_targets - coarse.detach().mean(0)) / 4
    assert torch.allclose(coarse.grad, expected.expand(4, 3))


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        HDCNNObjective([0.5, -0.1])
    with pytest.raises(ConfigError):
        HDCNNObjective([0.5, 0.5], consistency_weight=-1)
    obj = HDCNNObjective([0.5, 0.5])
    with pytest.raises(ConfigError, match="K=3"):
        obj({"logits": torch.zeros(2, 3), "coarse_probs": torch.full((2, 3), 1 / 3)}, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="coarse_probs"):
        obj(torch.zeros(2, 3), torch.tensor([0, 1]))

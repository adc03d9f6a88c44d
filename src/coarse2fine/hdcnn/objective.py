"""HD-CNN fine-tuning loss with the coarse category consistency term (METHODS.md §2.3).

E = -1/n sum_i log p_{y_i}  +  lambda/2 sum_k (t_k - 1/n sum_i B_ik)^2

with t_k the share of training images that fall in partial set S_k
(``coarse2fine.hierarchy.coarse_targets``). The fine components are pretrained with plain
cross-entropy on local labels (``engine.objective.CrossEntropyObjective``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from coarse2fine.engine.objective import Objective, Outputs
from coarse2fine.errors import ConfigError


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class HDCNNObjective(Objective):
    """Negative log-likelihood of the averaged prediction plus lambda/2 times the consistency term."""

    def __init__(self, coarse_targets: Sequence[float] | Tensor, consistency_weight: float = 20.0) -> None:
        super().__init__()
        t = torch.as_tensor(coarse_targets, dtype=torch.float32).flatten()
        if t.numel() == 0 or bool((t < 0).any()) or not torch.isfinite(t).all():
            raise ConfigError(f"HD-CNN coarse targets t_k must be non-negative and finite, got {t.tolist()}")
        if consistency_weight < 0:
            raise ConfigError(f"hdcnn.consistency_weight must be >= 0, got {consistency_weight}")
        self.register_buffer("coarse_targets", t)
        self.consistency_weight = float(consistency_weight)

    def forward(self, outputs: Outputs, targets: Tensor) -> dict[str, Tensor]:
        if isinstance(outputs, Tensor) or "coarse_probs" not in outputs:
            raise ConfigError("HDCNNObjective needs the HD-CNN model's output dict (with 'coarse_probs')")
        nll = F.nll_loss(_at_least_fp32(outputs["logits"]), targets)
        coarse = _at_least_fp32(outputs["coarse_probs"])
        if coarse.shape[-1] != self.coarse_targets.numel():
            raise ConfigError(
                f"HD-CNN has K={coarse.shape[-1]} coarse categories but {self.coarse_targets.numel()} targets t_k"
            )
        consistency = 0.5 * (self.coarse_targets.to(coarse.dtype) - coarse.mean(dim=0)).pow(2).sum()
        loss = nll + self.consistency_weight * consistency
        return {"loss": loss, "nll": nll.detach(), "consistency": consistency.detach()}

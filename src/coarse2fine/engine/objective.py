"""Loss objects: ``forward(outputs, targets) -> dict`` of named terms, the total under ``"loss"``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

Outputs = Tensor | Mapping[str, Any]


def logits_of(outputs: Outputs) -> Tensor:
    """The prediction scores of a model output (a tensor, or a dict's ``"logits"``)."""
    if isinstance(outputs, Tensor):
        return outputs
    return outputs["logits"]


def heads_of(outputs: Outputs) -> Mapping[str, Tensor]:
    """Extra classifier outputs whose accuracy is reported (empty for a plain model)."""
    if isinstance(outputs, Tensor):
        return {}
    return outputs.get("heads", {})


class Objective(nn.Module):
    """Base class of every loss. ``set_epoch`` is called at the start of each epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Epoch-dependent schedules (e.g. HERBS' temperature) override this."""

    def forward(self, outputs: Outputs, targets: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class CrossEntropyObjective(Objective):
    """Cross-entropy on the model's logits, with optional label smoothing.

    Soft targets ``(B, C)`` (Mixup/CutMix, ``FitSetup.batch_transform``) use timm's ``SoftTargetCrossEntropy``;
    they carry their own smoothing, so ``label_smoothing`` applies to hard labels only.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.soft: nn.Module | None = None  # timm's SoftTargetCrossEntropy, made on the first soft batch

    def forward(self, outputs: Outputs, targets: Tensor) -> dict[str, Tensor]:
        logits = logits_of(outputs).float()
        if targets.ndim == 2:
            if self.soft is None:
                from timm.loss import SoftTargetCrossEntropy  # timm is slow to import: only when mixing

                self.soft = SoftTargetCrossEntropy()
            loss = self.soft(logits, targets.float())
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}

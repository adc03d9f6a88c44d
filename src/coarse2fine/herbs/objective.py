"""HERBS losses (METHODS.md §3, "Losses"), every term returned separately.

- ``merged``: CE(Y_m, y), weight ``lambda_merged``;
- ``layer``: CE of each bottom-up classifier's token-averaged logits, summed over stages
  (``lambda_layer``);
- ``dropped``: MSE(tanh(logits of dropped tokens), -1), mean over tokens and classes, summed over
  stages (``lambda_dropped``);
- ``refine``: KL(softmax(Y_i2 / T_e) || softmax(Y_i1 / T_e)) per token, averaged over tokens and
  images, summed over stages; target Y_i2 (bottom-up) detached, student Y_i1 (top-down)
  (``lambda_refine``). ``T_e = T_0 * 0.5^floor(e / period)``. Over classes the KL is summed
  (``refine_reduction: sum``, the paper's formula) or averaged (``mean``: the official code's
  ``nn.KLDivLoss()``, whose default reduction averages over all B x N_i x C_gt elements of a stage,
  i.e. the sum divided by C_gt).

A term whose part the model lacks (e.g. no combiner) is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from coarse2fine.config import HERBSConfig
from coarse2fine.engine.objective import Objective
from coarse2fine.errors import ConfigError

REFINE_REDUCTIONS = ("sum", "mean")


def temperature_at(epoch: int, t0: float, period: int) -> float:
    """``T_e = T_0 * 0.5^floor(e / period)`` (METHODS.md §3), ``e`` counted from 0."""
    return t0 * 0.5 ** (epoch // max(1, period))


def dropped_loss(dropped: list[Tensor]) -> Tensor | None:
    terms = [
        F.mse_loss(torch.tanh(d.float()), torch.full_like(d, -1.0, dtype=torch.float32))
        for d in dropped
        if d.numel()
    ]
    return torch.stack(terms).sum() if terms else None


def refine_loss(
    student: list[Tensor], target: list[Tensor], temperature: float, reduction: str = "sum"
) -> Tensor | None:
    """Sum over stages of the per-token KL(target || student) of the tempered softmaxes, averaged
    over images and tokens; over classes summed (``sum``) or averaged (``mean``, = nn.KLDivLoss())."""
    terms = []
    for s, t in zip(student, target):
        log_q = F.log_softmax(s.float() / temperature, dim=-1)
        log_p = F.log_softmax(t.detach().float() / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none")  # (B, N, C) elements
        terms.append(kl.sum(-1).mean() if reduction == "sum" else kl.mean())
    return torch.stack(terms).sum() if terms else None


class HERBSObjective(Objective):
    """The HERBS loss; ``set_epoch`` drives the refinement temperature."""

    def __init__(self, cfg: HERBSConfig):
        super().__init__()
        self.lambda_merged = cfg.lambda_merged
        self.lambda_layer = cfg.lambda_layer
        self.lambda_dropped = cfg.lambda_dropped
        self.lambda_refine = cfg.lambda_refine
        if cfg.refine_reduction not in REFINE_REDUCTIONS:
            raise ConfigError(f"herbs.refine_reduction = {cfg.refine_reduction!r}: expected sum or mean")
        self.refine_reduction = cfg.refine_reduction
        self.t0 = cfg.temperature
        self.period = cfg.temperature_period
        self.epoch = 0

    @property
    def temperature(self) -> float:
        return temperature_at(self.epoch, self.t0, self.period)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def forward(self, outputs: Mapping[str, Any], targets: Tensor) -> dict[str, Tensor]:
        zero = targets.new_zeros((), dtype=torch.float32)
        merged = F.cross_entropy(outputs["merged"].float(), targets) if "merged" in outputs else None
        layers = [F.cross_entropy(lg.float(), targets) for lg in outputs.get("layer_logits", [])]
        layer = torch.stack(layers).sum() if layers else None
        dropped = dropped_loss(outputs.get("dropped", []))
        refine = refine_loss(
            outputs.get("refine_student", []),
            outputs.get("refine_target", []),
            self.temperature,
            self.refine_reduction,
        )
        terms = {"merged": merged, "layer": layer, "dropped": dropped, "refine": refine}
        weights = {
            "merged": self.lambda_merged,
            "layer": self.lambda_layer,
            "dropped": self.lambda_dropped,
            "refine": self.lambda_refine,
        }
        loss = zero
        for name, term in terms.items():
            if term is not None:  # a zero weight still adds the term, so DDP sees every parameter used
                loss = loss + weights[name] * term
        result = {name: (term.detach() if term is not None else zero) for name, term in terms.items()}
        result["loss"] = loss
        return result

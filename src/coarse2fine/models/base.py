"""The one contract every building block follows (ours and timm's).

Modelled on timm's ``features_only`` contract: stage outputs with channels and strides, a
``forward_features`` / ``forward_head`` split, ``reset_classifier``; plus ``split`` into the
*preceding* (shared) and *rear* layers that HD-CNN needs (METHODS.md §2.2).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from coarse2fine.errors import ModelError


@dataclass(frozen=True)
class StageInfo:
    """One feature stage: its name, output channels, total stride and module path."""

    name: str
    channels: int
    reduction: int
    module: str


class Backbone(nn.Module):
    """Base class of every model the factory makes.

    Subclasses set ``num_classes``, ``in_chans``, ``default_input_size``, ``feature_info`` and
    ``token_layout`` and implement ``sequence`` (the modules in execution order, whose composition
    is ``forward``), ``forward_stages`` and ``reset_classifier``.
    """

    num_classes: int
    in_chans: int
    default_input_size: tuple[int, int, int]
    feature_info: list[StageInfo]
    token_layout: str = "nchw"

    # ---- to implement -------------------------------------------------------------------------
    def sequence(self) -> list[tuple[str, nn.Module]]:
        """Modules in execution order; running them one after another equals ``forward``.

        The last entry is the classifier head (features -> logits).
        """
        raise NotImplementedError

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """One output per ``feature_info`` entry."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    # ---- shared behaviour ---------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        for _, module in self.sequence()[:-1]:
            x = module(x)
        return x

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.sequence()[-1][1](feats)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def stage_names(self) -> list[str]:
        return [s.name for s in self.feature_info]

    def stage(self, name: str) -> StageInfo:
        for info in self.feature_info:
            if info.name == name:
                return info
        raise ModelError(f"model {type(self).__name__} has no stage {name!r}; stages: {self.stage_names()}")

    def split(self, stage: str) -> tuple[nn.Sequential, nn.Sequential]:
        """(preceding, rear) with ``rear(preceding(x)) == forward(x)``; preceding ends at ``stage``.

        The two modules share parameters with ``self``; deep-copy them for independent copies.
        """
        info = self.stage(stage)
        seq = self.sequence()
        names = [n for n, _ in seq]
        if info.module not in names:
            raise ModelError(
                f"stage {stage!r} (module {info.module!r}) is not a split point of "
                f"{type(self).__name__}; split points: {names[:-1]}"
            )
        cut = names.index(info.module) + 1
        if cut >= len(seq):
            raise ModelError(f"stage {stage!r} is the last module; the rear would be empty")
        preceding = nn.Sequential(OrderedDict(seq[:cut]))
        rear = nn.Sequential(OrderedDict(seq[cut:]))
        return preceding, rear

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def stage_shapes(self, input_size: tuple[int, int, int] | None = None) -> list[tuple[int, ...]]:
        """Shapes of the stage outputs for one image of ``input_size`` (default: the model's)."""
        c, h, w = input_size or self.default_input_size
        was_training = self.training
        self.eval()
        try:
            outs = self.forward_stages(torch.zeros(1, c, h, w))
        finally:
            self.train(was_training)
        return [tuple(o.shape[1:]) for o in outs]

"""Tiny backbones for the HERBS and model tests: a 4-stage CNN, a token (B, N, C) model and a real timm Swin."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from coarse2fine.models import create_model
from coarse2fine.models.base import Backbone, StageInfo

NUM_CLASSES = 5


class TinyCNN(Backbone):
    """4 stride-2 conv stages, (B, C, H, W) outputs, plus a classifier head."""

    token_layout = "nchw"

    def __init__(self, num_classes: int = NUM_CLASSES, in_chans: int = 1, width: int = 8, stages: int = 4):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.default_input_size = (in_chans, 32, 32)
        chans = [width * 2**i for i in range(stages)]
        blocks, prev = [], in_chans
        for c in chans:
            blocks.append(nn.Sequential(nn.Conv2d(prev, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU()))
            prev = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes))
        self.feature_info = [StageInfo(f"stage{i + 1}", c, 2 ** (i + 1), f"blocks.{i}") for i, c in enumerate(chans)]

    def sequence(self) -> list[tuple[str, nn.Module]]:
        return [*((f"blocks.{i}", b) for i, b in enumerate(self.blocks)), ("head", self.head)]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        for b in self.blocks:
            x = b(x)
            outs.append(x)
        return outs

    def reset_classifier(self, num_classes: int) -> None:
        self.head[-1] = nn.Linear(self.head[-1].in_features, num_classes)


class TinyTokens(Backbone):
    """Swin-like: patch embedding /4, stages at /4, /8, /16, /16 as (B, N, C) tokens."""

    token_layout = "nlc"

    def __init__(self, num_classes: int = NUM_CLASSES, in_chans: int = 3, dim: int = 8):
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.default_input_size = (in_chans, 32, 32)
        self.embed = nn.Conv2d(in_chans, dim, 4, 4)
        self.mix = nn.ModuleList(nn.Linear(dim * 2**i, dim * 2**i) for i in range(3))
        self.merge = nn.ModuleList(nn.Conv2d(dim * 2**i, dim * 2 ** (i + 1), 2, 2) for i in range(2))
        self.last = nn.Linear(dim * 4, dim * 4)
        self.head = nn.Linear(dim * 4, num_classes)
        reds = [4, 8, 16, 16]
        chans = [dim, dim * 2, dim * 4, dim * 4]
        self.feature_info = [StageInfo(f"stage{i + 1}", c, r, f"s{i}") for i, (c, r) in enumerate(zip(chans, reds))]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        g = self.embed(x)
        outs = []
        for i in range(3):
            t = self.mix[i](g.flatten(2).transpose(1, 2))
            outs.append(t)
            if i < 2:
                b, _n, c = t.shape
                g = self.merge[i](t.transpose(1, 2).reshape(b, c, g.shape[2], g.shape[3]))
        outs.append(self.last(outs[-1]))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_stages(x)[-1].mean(1))

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.head.in_features, num_classes)


def tiny_swin(size: int, num_classes: int = 5, **kwargs: Any) -> nn.Module:
    """A real timm Swin (one block per stage, width 24) for ``size`` px inputs; also used by the HERBS tests."""
    return create_model("timm/swin_tiny_patch4_window7_224", num_classes, img_size=size, window_size=2,
                        embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), **kwargs)

"""Network-in-Network, HD-CNN's CIFAR building block (METHODS.md §2.4, last bullet).

conv 5x5 192, 1x1 160, 1x1 96, max-pool 3/2, dropout; conv 5x5 192, 1x1 192, 1x1 192, avg-pool 3/2,
dropout; conv 3x3 192, 1x1 192, 1x1 C, global average pool. ReLU after every conv; pools use
Caffe's ceil mode (32 -> 16 -> 8). ``stage1`` ends with pool1 (HD-CNN's shared layers on CIFAR);
each dropout opens the next stage. The last 1x1 conv is the classifier (``head.conv``); the
original Caffe model also put a ReLU on it (``final_relu=True``), off by default.

Parameters 966,986 (10 classes) or 984,356 (100 classes); forward 0.44 GFLOPs at 3x32x32, 0.33 at
1x28x28 (``model_summary``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from coarse2fine.models.base import Backbone, StageInfo
from coarse2fine.models.vgg import init_weights


def _mlpconv(in_c: int, widths: Sequence[int], k: int) -> OrderedDict[str, nn.Module]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_c
    for i, w in enumerate(widths, 1):
        size = k if i == 1 else 1
        layers[f"conv{i}"] = nn.Conv2d(c, w, size, padding=size // 2)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        c = w
    return layers


class NINHead(nn.Module):
    """The last 1x1 conv (C outputs), global average pool, flatten."""

    def __init__(self, in_c: int, num_classes: int, final_relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_c, num_classes, 1)
        self.final_relu = final_relu

    def score_map(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return x.relu() if self.final_relu else x

    def forward(self, x: Tensor) -> Tensor:
        return self.score_map(x).mean((2, 3))


class NIN(Backbone):
    """Network-in-Network with three mlpconv stages (METHODS.md §2.4)."""

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        input_size: int | Sequence[int] = 32,
        dropout: float = 0.5,
        final_relu: bool = False,
        init: str | None = None,
    ) -> None:
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = (in_chans, h, w)
        s1 = _mlpconv(in_chans, (192, 160, 96), 5)
        s1["pool"] = nn.MaxPool2d(3, 2, ceil_mode=True)
        s2 = OrderedDict([("drop", nn.Dropout(dropout)), *_mlpconv(96, (192, 192, 192), 5).items()])
        s2["pool"] = nn.AvgPool2d(3, 2, ceil_mode=True)
        s3 = OrderedDict([("drop", nn.Dropout(dropout)), *_mlpconv(192, (192, 192), 3).items()])
        self.stage1, self.stage2, self.stage3 = nn.Sequential(s1), nn.Sequential(s2), nn.Sequential(s3)
        self.head = NINHead(192, num_classes, final_relu)
        self.feature_info = [
            StageInfo("stage1", 96, 2, "stage1"),
            StageInfo("stage2", 192, 4, "stage2"),
            StageInfo("stage3", 192, 4, "stage3"),
        ]
        self.classifier_name = "head.conv"
        self.init = init or "kaiming"
        init_weights(self, self.init)

    def sequence(self) -> list[tuple[str, nn.Module]]:
        return [("stage1", self.stage1), ("stage2", self.stage2), ("stage3", self.stage3), ("head", self.head)]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        for _, stage in self.sequence()[:-1]:
            x = stage(x)
            outs.append(x)
        return outs

    def reset_classifier(self, num_classes: int) -> None:
        old = self.head.conv
        self.head.conv = nn.Conv2d(old.in_channels, num_classes, 1).to(old.weight.device, old.weight.dtype)
        init_weights(self.head, self.init)
        self.num_classes = num_classes

    def to_dense(self) -> nn.Module:
        """NIN is fully convolutional already: the class-score map before the global pool."""
        return _DenseNIN(self)


class _DenseNIN(nn.Module):
    def __init__(self, nin: NIN) -> None:
        super().__init__()
        self.nin = nin
        self.num_classes = nin.num_classes
        self.min_input_size = (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.nin.head.score_map(self.nin.forward_features(x))

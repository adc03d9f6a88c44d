"""VGG building blocks (METHODS.md §1): configurations A, A-LRN, B, C, D, E and small-input variants.

Each network is five (or, small variants, three to five) stages of 3x3 convolutions, each stage
ending with its 2x2 max-pool, then an FC head sized to the final map at the default input size
(no adaptive pool). ``to_dense()`` gives the fully convolutional copy used by the dense test
protocol; ``init_from_shallower`` copies a trained configuration A into a deeper net.

Parameters and forward FLOPs, computed by ``model_summary`` (FlopCounterMode: 2 per multiply-add,
convolutions and matmuls only); 1000 classes for the paper nets, 10 for the small ones:

| name | input | params | params ``_bn`` | forward |
|---|---|---|---|---|
| vgg11 (A) | 3x224x224 | 132,863,336 | 132,868,840 | 15.22 GFLOPs |
| vgg11_lrn (A-LRN) | 3x224x224 | 132,863,336 | 132,868,840 | 15.22 GFLOPs |
| vgg13 (B) | 3x224x224 | 133,047,848 | 133,053,736 | 22.62 GFLOPs |
| vgg16_c (C) | 3x224x224 | 133,638,952 | 133,647,400 | 23.54 GFLOPs |
| vgg16 (D) | 3x224x224 | 138,357,544 | 138,365,992 | 30.94 GFLOPs |
| vgg19 (E) | 3x224x224 | 143,667,240 | 143,678,248 | 39.26 GFLOPs |
| vgg_small | 1x28x28 | 385,266 | 385,938 | 33.3 MFLOPs |
| vgg_small | 3x32x32 | 557,730 | 558,402 | 44.6 MFLOPs |
| vgg_small_fast | 1x28x28 | 565,546 | 566,346 | 40.6 MFLOPs |
| vgg_small_fast | 3x32x32 | 795,210 | 796,010 | 53.8 MFLOPs |
| vgg16_small | 1x28x28 | 14,981,322 | 14,989,770 | 410.8 MFLOPs |
| vgg16_small | 3x32x32 | 15,768,906 | 15,777,354 | 628.5 MFLOPs |

Small variants (input 28 with ``in_chans=1``, else 32; ``input_size=`` to change):

- ``vgg_small[_bn]``: ``24 24 M 48 48 M 96 96 M`` (three stages, final map 3x3 / 4x4), FC-256,
  dropout, FC-C. Sized for Fashion-MNIST on a 2-core CPU: ~33 MFLOPs per image, so ~15-20 epochs
  of 54k images fit in 20 minutes at ~60-90 GFLOP/s. A GPU proxy run of the recipe (SGD nesterov,
  one-cycle lr 0.05, label smoothing 0.1, pad-crop + flip, 20 epochs) gave 94.0 % test accuracy
  (94.4 % with flip averaging); wider (32-64-128, 58.8 MFLOPs) gave 94.2 %, and keeping the 7x7
  map of those widths (61.5 MFLOPs) 94.5 %.
- ``vgg_small_fast[_bn]``: ``16 M 64 64 M 128 128 M``, FC-256: one thin convolution at full
  resolution, the width where the CPU kernels are efficient (64-128 channels reach 80-90 % of the
  fp32 matmul peak, 24-48 channels 60-70 %). 22 % more multiply-adds than ``vgg_small`` at about the
  same training time per image (``benchmarks/throughput.py``), but on Fashion-MNIST it reached
  92.7 % in 15 epochs against ``vgg_small_bn``'s 93.3 % in 14 (docs/BENCHMARKS.md): the throughput
  design, not the accuracy one.
- ``vgg16_small[_bn]``: configuration D's layers (64 ... 512) with four pools (no fifth: the
  final map is 1x1 at 28, 2x2 at 32), FC-512, dropout, FC-C: the usual CIFAR VGG-16.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from coarse2fine.errors import ModelError
from coarse2fine.models.base import Backbone, StageInfo

# A stage is a list of convolutions: ``c`` is a 3x3 conv with c outputs, ``(c, 1)`` a 1x1 conv.
ConvSpec = int | tuple[int, int]
StageSpec = Sequence[ConvSpec]

_PAPER_CFGS: dict[str, list[list[ConvSpec]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "C": [[64, 64], [128, 128], [256, 256, (256, 1)], [512, 512, (512, 1)], [512, 512, (512, 1)]],
    "D": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}

INITS = ("paper", "glorot", "kaiming")


def _conv_spec(spec: ConvSpec) -> tuple[int, int]:
    return (spec, 3) if isinstance(spec, int) else (int(spec[0]), int(spec[1]))


def _scale(spec: ConvSpec, mult: float) -> tuple[int, int]:
    c, k = _conv_spec(spec)
    return max(1, round(c * mult)), k


def _make_stage(in_chans: int, convs: StageSpec, batch_norm: bool, lrn: bool, pool: bool) -> nn.Sequential:
    """``conv{i}[, bn{i}], relu{i}`` for each conv (``lrn`` after the first), then ``pool``.

    The last ReLU runs after the pool (``..., pool, relu{n}``): ReLU is monotone, so
    ``relu(max(x)) == max(relu(x))`` and the gradients match, on a quarter of the elements.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_chans
    n = len(convs)
    for i, spec in enumerate(convs, 1):
        out, k = _conv_spec(spec)
        layers[f"conv{i}"] = nn.Conv2d(c, out, k, padding=k // 2)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(out)
        has_lrn = lrn and i == 1
        if pool and i == n and not has_lrn:
            layers["pool"] = nn.MaxPool2d(2, 2)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        if has_lrn:
            layers["lrn"] = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
        c = out
    if pool and "pool" not in layers:
        layers["pool"] = nn.MaxPool2d(2, 2)
    return nn.Sequential(layers)


MAX_FC1_WEIGHTS = 2**30  # 4 GiB in float32: ten times VGG-16's fc6 at 224


class VGGHead(nn.Module):
    """Flatten, then ``fc1, relu1, drop1, ..., fc{n}``: FC-hidden x (len) then FC-num_classes."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden = tuple(hidden)
        self.dropout = dropout
        self.flatten = nn.Flatten(1)
        c = in_features
        for i, h in enumerate(self.hidden, 1):
            self.add_module(f"fc{i}", nn.Linear(c, h))
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            self.add_module(f"drop{i}", nn.Dropout(dropout))
            c = h
        self.add_module(f"fc{len(self.hidden) + 1}", nn.Linear(c, num_classes))

    @property
    def fcs(self) -> list[nn.Linear]:
        return [m for m in self.children() if isinstance(m, nn.Linear)]

    @property
    def classifier(self) -> nn.Linear:
        return self.fcs[-1]

    def reset_classifier(self, num_classes: int) -> None:
        last = self.classifier
        name = f"fc{len(self.hidden) + 1}"
        new = nn.Linear(last.in_features, num_classes)
        nn.init.normal_(new.weight, 0.0, 0.01)
        nn.init.zeros_(new.bias)
        setattr(self, name, new.to(last.weight.device, last.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


class VGG(Backbone):
    """VGG network from a list of stages (METHODS.md §1).

    Args:
        stages: per stage, its convolutions (``c`` 3x3, ``(c, 1)`` 1x1).
        num_classes, in_chans: classifier outputs and image channels.
        input_size: (H, W) or side the head is sized for (the final map is flattened into FC1).
        batch_norm: BatchNorm after every convolution.
        lrn: LocalResponseNorm(5, 1e-4, 0.75, 2) after the first convolution (A-LRN).
        hidden: widths of the hidden FC layers (paper: 4096, 4096).
        dropout: dropout after each hidden FC layer.
        pools: per stage, whether it ends with a 2x2 max-pool (default: all).
        init: ``paper`` N(0, 1e-2) / ``glorot`` / ``kaiming``; default kaiming with BN, glorot without.
        width_mult: scales every conv width (narrow copies for tests and quick runs).
    """

    def __init__(
        self,
        stages: Sequence[StageSpec],
        num_classes: int = 1000,
        in_chans: int = 3,
        input_size: int | Sequence[int] = 224,
        batch_norm: bool = False,
        lrn: bool = False,
        hidden: Sequence[int] = (4096, 4096),
        dropout: float = 0.5,
        pools: Sequence[bool] | None = None,
        init: str | None = None,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        if width_mult != 1.0:
            stages = [[_scale(spec, width_mult) for spec in convs] for convs in stages]
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        pools = [True] * len(stages) if pools is None else list(pools)
        if len(pools) != len(stages):
            raise ModelError(f"VGG: {len(pools)} pool flags for {len(stages)} stages")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = (in_chans, h, w)
        self.batch_norm = batch_norm
        self.num_stages = len(stages)
        info: list[StageInfo] = []
        c, reduction = in_chans, 1
        for i, (convs, pool) in enumerate(zip(stages, pools), 1):
            self.add_module(f"stage{i}", _make_stage(c, convs, batch_norm, lrn and i == 1, pool))
            c = _conv_spec(convs[-1])[0]
            if pool:
                reduction *= 2
                h, w = h // 2, w // 2
            info.append(StageInfo(f"stage{i}", c, reduction, f"stage{i}"))
        if h < 1 or w < 1:
            raise ModelError(f"VGG: input size {input_size} is too small for {sum(pools)} max-pools")
        self.feature_info = info
        self.final_map = (c, h, w)
        fc1 = c * h * w * (list(hidden) or [num_classes])[0]
        if fc1 > MAX_FC1_WEIGHTS:  # allocating it would take minutes or fail; nobody trains such a head
            raise ModelError(
                f"VGG: input size {input_size} gives a final map of {c}x{h}x{w}, so fc1 would hold {fc1:,} weights "
                f"(over {MAX_FC1_WEIGHTS:,}; VGG-16 at 224 has 102,760,448): train at a smaller data.image_size "
                "and evaluate larger images densely (to_dense)"
            )
        self.head = VGGHead(c * h * w, hidden, num_classes, dropout)
        self.classifier_name = f"head.fc{len(self.head.hidden) + 1}"
        self.init = init or ("kaiming" if batch_norm else "glorot")
        init_weights(self, self.init)

    def sequence(self) -> list[tuple[str, nn.Module]]:
        seq = [(f"stage{i}", getattr(self, f"stage{i}")) for i in range(1, self.num_stages + 1)]
        return [*seq, ("head", self.head)]

    def forward_features(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return x

    def forward_head(self, feats: Tensor) -> Tensor:
        if tuple(feats.shape[1:]) != self.final_map:
            raise ModelError(
                f"VGG head expects a final map of {self.final_map} (input {self.default_input_size}); got "
                f"{tuple(feats.shape[1:])}: build with input_size=... or use to_dense() for other sizes"
            )
        return self.head(feats)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
            outs.append(x)
        return outs

    def reset_classifier(self, num_classes: int) -> None:
        self.head.reset_classifier(num_classes)
        self.num_classes = num_classes

    def to_dense(self) -> DenseVGG:
        """Fully convolutional copy (METHODS.md §1 dense testing): FC1 -> conv with the final-map kernel."""
        return DenseVGG(self)


class DenseVGG(nn.Module):
    """VGG with its FC layers run as convolutions; returns a class-score map (B, C, h, w).

    Runs on any input whose final map is at least the training one (``min_input_size``); at the
    training size the map is 1x1 and equals the FC logits.
    """

    def __init__(self, vgg: VGG) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            OrderedDict((name, copy.deepcopy(m)) for name, m in vgg.sequence()[:-1])
        )
        c, h, w = vgg.final_map
        self.kernel = (h, w)
        self.num_classes = vgg.num_classes
        self.default_input_size = vgg.default_input_size
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_c = c
        fcs = vgg.head.fcs
        for i, fc in enumerate(fcs, 1):
            k = (h, w) if i == 1 else (1, 1)
            conv = nn.Conv2d(in_c, fc.out_features, k)
            with torch.no_grad():
                conv.weight.copy_(fc.weight.reshape(fc.out_features, in_c, *k))
                conv.bias.copy_(fc.bias)
            layers[f"fc{i}"] = conv.to(fc.weight.device, fc.weight.dtype)
            if i < len(fcs):
                layers[f"relu{i}"] = nn.ReLU(inplace=True)
                layers[f"drop{i}"] = nn.Dropout(vgg.head.dropout)
            in_c = fc.out_features
        self.head = nn.Sequential(layers)
        reduction = vgg.feature_info[-1].reduction
        self.min_input_size = (h * reduction, w * reduction)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] < self.min_input_size[0] or x.shape[-1] < self.min_input_size[1]:
            raise ModelError(
                f"dense VGG needs inputs of at least {self.min_input_size} (H, W); got {tuple(x.shape[-2:])}"
            )
        return self.head(self.stages(x))


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str) -> None:
    """METHODS.md §1 initialisation: ``paper`` N(0, variance 1e-2) and zero bias; ``glorot``; ``kaiming``."""
    if scheme not in INITS:
        raise ModelError(f"unknown init {scheme!r}; valid: {', '.join(INITS)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "paper":
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif scheme == "glorot":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_names(model_sd: Mapping[str, Any]) -> list[str]:
    """``stageS.convI`` prefixes of the conv layers, in network order."""
    names = [k[: -len(".weight")] for k in model_sd if k.startswith("stage") and ".conv" in k and k.endswith(".weight")]
    return sorted(names, key=lambda n: (int(n.split(".")[0][5:]), int(n.split(".")[1][4:])))


@torch.no_grad()
def init_from_shallower(model: VGG, state_dict: Mapping[str, Tensor], num_convs: int = 4) -> list[str]:
    """Copy the first ``num_convs`` convs and all FC layers of a trained net (METHODS.md §1: from A).

    Layers are matched by name (``stage3.conv2`` of A goes to ``stage3.conv2`` of D), so A's first
    four convs land on the first conv of stages 1-2 and the first two of stage 3. Returns the names
    of the copied tensors; a missing layer or a shape mismatch raises ModelError naming it.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    target = model.state_dict()
    names = _conv_names(sd)[:num_convs] + [f"head.fc{i}" for i in range(1, len(model.head.fcs) + 1)]
    pairs = [(f"{n}.{p}", f"{n}.{p}") for n in names for p in ("weight", "bias")]
    for src, dst in pairs:
        if src not in sd:
            raise ModelError(f"init_from: the source state dict has no {src!r} (is it a VGG?)")
        if dst not in target:
            raise ModelError(f"init_from: the model has no layer {dst!r} to receive {src!r}")
        if tuple(sd[src].shape) != tuple(target[dst].shape):
            raise ModelError(
                f"init_from: shape of {src!r} is {tuple(sd[src].shape)} in the source but "
                f"{tuple(target[dst].shape)} in the model"
            )
    for src, dst in pairs:
        target[dst].copy_(sd[src])
    return [dst for _, dst in pairs]


# ---- registry ------------------------------------------------------------------------------------

_SMALL = [[24, 24], [48, 48], [96, 96]]
_SMALL_FAST = [[16], [64, 64], [128, 128]]
_SMALL16 = [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3]


def _paper(cfg: str, batch_norm: bool = False, lrn: bool = False):
    def build(**kwargs: Any) -> VGG:
        return VGG(_PAPER_CFGS[cfg], batch_norm=batch_norm, lrn=lrn, **kwargs)

    return build


def _small(stages: list[list[ConvSpec]], hidden: int, batch_norm: bool, pools: list[bool] | None = None):
    def build(**kwargs: Any) -> VGG:
        kwargs.setdefault("input_size", 28 if kwargs.get("in_chans", 3) == 1 else 32)
        kwargs.setdefault("hidden", (hidden,))
        kwargs.setdefault("pools", pools)
        return VGG(stages, batch_norm=batch_norm, **kwargs)

    return build


VGG_MODELS = {
    "vgg11": _paper("A"),
    "vgg11_lrn": _paper("A", lrn=True),
    "vgg13": _paper("B"),
    "vgg16_c": _paper("C"),
    "vgg16": _paper("D"),
    "vgg19": _paper("E"),
    "vgg11_bn": _paper("A", True),
    "vgg11_lrn_bn": _paper("A", True, lrn=True),
    "vgg13_bn": _paper("B", True),
    "vgg16_c_bn": _paper("C", True),
    "vgg16_bn": _paper("D", True),
    "vgg19_bn": _paper("E", True),
    "vgg_small": _small(_SMALL, 256, False),
    "vgg_small_bn": _small(_SMALL, 256, True),
    "vgg_small_fast": _small(_SMALL_FAST, 256, False),
    "vgg_small_fast_bn": _small(_SMALL_FAST, 256, True),
    "vgg16_small": _small(_SMALL16, 512, False, [True, True, True, True, False]),
    "vgg16_small_bn": _small(_SMALL16, 512, True, [True, True, True, True, False]),
}



# ---- timm's (torchvision's) ImageNet weights -----------------------------------------------------


def _timm_layers(sd: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """("conv" | "bn", index) of timm VGG's ``features.<index>`` layers, in network order."""
    indices = sorted({int(k.split(".")[1]) for k in sd if k.startswith("features.") and k.endswith(".weight")})
    return [("bn" if f"features.{i}.running_mean" in sd else "conv", i) for i in indices]


@torch.no_grad()
def vgg_state_from_timm(model: VGG, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """``model``'s state from a timm VGG state dict (``features.N``, ``pre_logits.fc1/fc2``, ``head.fc``).

    Convolutions (and BatchNorms) map in network order; a first convolution for other input channels is
    adapted as timm does (``adapt_input_conv``). The FC layers are timm's 7x7 / 1x1 convolutions reshaped;
    from the first whose shape differs (a head sized for another input than 224, other hidden widths, another
    class count) on, they keep their initialisation and are listed under ``skipped``. Returns (state,
    {"loaded", "skipped"}).
    """
    from timm.models import adapt_input_conv

    target = model.state_dict()
    ours = _conv_names(target)
    theirs = [i for kind, i in _timm_layers(sd) if kind == "conv"]
    if len(ours) != len(theirs):
        raise ModelError(f"pretrained VGG weights have {len(theirs)} convolutions, the model {len(ours)}")
    pairs: dict[str, Tensor] = {}
    bns = {i for kind, i in _timm_layers(sd) if kind == "bn"}
    for name, i in zip(ours, theirs):
        pairs[f"{name}.weight"], pairs[f"{name}.bias"] = sd[f"features.{i}.weight"], sd[f"features.{i}.bias"]
        bn = name.replace(".conv", ".bn")
        if (i + 1 in bns) != (f"{bn}.weight" in target):
            raise ModelError("pretrained VGG weights and the model differ in BatchNorm (_bn weights for _bn models)")
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked") if i + 1 in bns else ():
            pairs[f"{bn}.{p}"] = sd[f"features.{i + 1}.{p}"]
    first = f"{ours[0]}.weight"
    pairs[first] = adapt_input_conv(model.in_chans, pairs[first].float()).to(pairs[first].dtype)
    bad = sorted(k for k, v in pairs.items() if tuple(v.shape) != tuple(target[k].shape))
    if bad:
        raise ModelError(f"pretrained VGG weights do not fit the model's convolutions: {', '.join(bad[:3])}")
    skipped: list[str] = []
    fcs = [f"head.fc{i}" for i in range(1, len(model.head.fcs) + 1)]
    for ours_fc, theirs_fc in zip(fcs, ("pre_logits.fc1", "pre_logits.fc2", "head.fc")):
        weight = sd[f"{theirs_fc}.weight"].flatten(1)  # timm's (out, c, h, w) -> (out, c*h*w)
        if skipped or tuple(weight.shape) != tuple(target[f"{ours_fc}.weight"].shape):
            skipped.append(ours_fc)  # this and every later FC layer keep their initialisation
            continue
        pairs[f"{ours_fc}.weight"], pairs[f"{ours_fc}.bias"] = weight, sd[f"{theirs_fc}.bias"]
    skipped += fcs[3:]
    return pairs, {"loaded": sorted(pairs), "skipped": skipped}

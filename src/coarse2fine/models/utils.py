"""Helpers for methods that copy parts of a building block (HD-CNN's fine components)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from coarse2fine.errors import ModelError
from coarse2fine.models.base import Backbone


def reset_last_layer(module: nn.Module, num_outputs: int) -> nn.Module:
    """Replace the last ``nn.Linear`` / ``nn.Conv2d`` of ``module`` (in module order) by a fresh one
    with ``num_outputs`` outputs, in place; returns the new layer.

    For a rear part of a VGG (``...head.fc3``), NIN (``head.conv``) or a timm CNN (``fc``/``classifier``).
    """
    last_name = None
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last_name, last = name, m
    if last_name is None:
        raise ModelError(f"{type(module).__name__} has no Linear or Conv2d layer to resize")
    parent = module
    *path, leaf = last_name.split(".")
    for p in path:
        parent = getattr(parent, p)
    if isinstance(last, nn.Linear):
        new: nn.Module = nn.Linear(last.in_features, num_outputs, bias=last.bias is not None)
        nn.init.normal_(new.weight, 0.0, 0.01)
    else:
        new = nn.Conv2d(last.in_channels, num_outputs, last.kernel_size, last.stride, last.padding,
                        bias=last.bias is not None)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    new = new.to(last.weight.device, last.weight.dtype)
    setattr(parent, leaf, new)
    return new


def split_sequence(model: Backbone, stage: str) -> tuple[nn.Sequential, nn.Sequential]:
    """``Backbone.split`` with ``OrderedDict`` (``nn.Sequential`` rejects a plain dict on torch 2.x).

    (preceding, rear) with ``rear(preceding(x)) == model(x)``; preceding ends with ``stage``.
    """
    info = model.stage(stage)
    seq = model.sequence()
    names = [n for n, _ in seq]
    if info.module not in names:
        raise ModelError(
            f"stage {stage!r} (module {info.module!r}) is not a split point of "
            f"{type(model).__name__}; split points: {names[:-1]}"
        )
    cut = names.index(info.module) + 1
    if cut >= len(seq):
        raise ModelError(f"stage {stage!r} is the last module; the rear would be empty")
    return nn.Sequential(OrderedDict(seq[:cut])), nn.Sequential(OrderedDict(seq[cut:]))

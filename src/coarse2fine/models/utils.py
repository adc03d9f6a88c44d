"""Helpers for methods that copy parts of a building block (HD-CNN's fine components)."""

from __future__ import annotations

from torch import nn

from coarse2fine.errors import ModelError


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



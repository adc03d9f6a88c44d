"""Quantised layers: ``PQLinear`` and ``PQConv2d`` store uint8 codes and fp32 centres instead of the
weight and rebuild it on the fly (METHODS.md §2.4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coarse2fine.compress.quantize import _check_sk, dequantise, oriented, pq_buffers
from coarse2fine.errors import ModelError


def _layer_dims(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return int(w.shape[0]), int(w[0].numel())


class _PQMixin(nn.Module):
    """Holds ``codes`` (uint8 buffer) and ``centers`` (fp32 buffer); rebuilds the weight.

    In eval mode the rebuilt weight is cached after the first forward; the cache is dropped on
    ``train()``, ``load_state_dict`` and device / dtype moves.
    """

    codes: Tensor
    centers: Tensor

    def _init_pq(self, m: int, n: int, s: int, k: int, axis: str = "rows") -> None:
        """Buffers for a ``(m, n)`` weight; ``axis="columns"`` stores the codes of ``W^T``."""
        codes, centers = pq_buffers(m, n, s, k, axis)
        self.s, self.k, self.n, self.axis = s, k, oriented(m, n, axis)[1], axis
        self.register_buffer("codes", torch.zeros(codes, dtype=torch.uint8))
        self.register_buffer("centers", torch.zeros(centers, dtype=torch.float32))
        self._cached: Tensor | None = None

    def set_quantized(self, codes: Tensor, centers: Tensor) -> None:
        if codes.shape != self.codes.shape or centers.shape != self.centers.shape:
            raise ModelError(
                f"quantised tensors {tuple(codes.shape)}, {tuple(centers.shape)} do not fit "
                f"{tuple(self.codes.shape)}, {tuple(self.centers.shape)}"
            )
        with torch.no_grad():
            self.codes.copy_(codes)
            self.centers.copy_(centers)
        self._cached = None

    def weight_matrix(self) -> Tensor:
        c = self._cached
        # an inference-mode tensor cannot take part in autograd: rebuilt outside inference mode
        if c is not None and not self.training and (torch.is_inference_mode_enabled() or not c.is_inference()):
            return c
        w = dequantise(self.codes, self.centers, self.n, self.axis)
        if not self.training:
            self._cached = w
        return w

    def train(self, mode: bool = True) -> _PQMixin:
        self._cached = None
        return super().train(mode)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _PQMixin:
        self._cached = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def compressed_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.centers.numel() * self.centers.element_size()


class PQLinear(_PQMixin):
    """``nn.Linear`` whose weight is product-quantised (METHODS.md §2.4)."""

    def __init__(
        self, in_features: int, out_features: int, s: int, k: int, bias: bool = True, axis: str = "rows"
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_pq(out_features, in_features, s, k, axis)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self) -> Tensor:
        return self.weight_matrix()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_matrix().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}, k={self.k}, "
            f"axis={self.axis}"
        )

    @classmethod
    def empty_like(cls, layer: nn.Linear, s: int, k: int, axis: str = "rows") -> PQLinear:
        k = _check_sk(oriented(layer.out_features, layer.in_features, axis)[0], s, k)
        return cls(layer.in_features, layer.out_features, s, k, bias=layer.bias is not None, axis=axis)


class PQConv2d(_PQMixin):
    """``nn.Conv2d`` whose weight (flattened ``out x in/groups*kh*kw``) is product-quantised (METHODS.md §2.4)."""

    def __init__(self, conv: nn.Conv2d, s: int, k: int, axis: str = "rows") -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding = list(getattr(conv, "_reversed_padding_repeated_twice", []))
        self.weight_shape = tuple(conv.weight.shape)
        n = int(np.prod(self.weight_shape[1:]))
        self._init_pq(self.out_channels, n, s, k, axis)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if conv.bias is not None else None

    @property
    def weight(self) -> Tensor:
        return self.weight_matrix().view(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, s={self.s}, k={self.k}, axis={self.axis}"
        )

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, s: int, k: int, axis: str = "rows") -> PQConv2d:
        m, n = _layer_dims(conv)
        return cls(conv, s, _check_sk(oriented(m, n, axis)[0], s, k), axis)



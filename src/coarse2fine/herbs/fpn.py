"""HERBS feature fusion (METHODS.md §3, "Feature fusion") on token sequences of any size.

Every stage is handled as tokens ``(B, N, F)`` plus a *grid*: ``(H, W)`` when the tokens are a
2-D map, ``None`` when they are a plain sequence.

- CNN stages ``(B, C, H, W)`` are flattened to ``H W`` tokens with grid ``(H, W)``.
- Transformer stages ``(B, N, C)`` get the grid ``(ceil(H/r), ceil(W/r))`` (input size ``H x W``,
  stage reduction ``r``) when that has ``N`` cells, else ``(sqrt N, sqrt N)`` when ``N`` is a
  square; otherwise (e.g. a class token in front) they stay 1-D and resizing uses 1-D
  interpolation / pooling along the sequence.

Resizing between stages never learns over the token axis (the official code's ``Conv1d`` over
tokens ties it to one input size): the top-down path upsamples by bilinear (or linear)
interpolation, the bottom-up path downsamples by adaptive average pooling followed by a learned
per-token linear map. So the same weights work at every input size.

As in the official code, the bottom-up path first passes every top-down output through its own
per-token Linear - ReLU - Linear (F -> F) before the downsampled previous stage is added
(``bottom_up_proj``), so the bottom-up b_1 differs from the top-down t_1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coarse2fine.errors import ModelError

Grid = tuple[int, int] | None


def to_tokens(feat: Tensor, layout: str, input_hw: tuple[int, int], reduction: int) -> tuple[Tensor, Grid]:
    """A stage output as tokens ``(B, N, C)`` and its grid (see the module docstring)."""
    if layout == "nchw":
        if feat.dim() != 4:
            raise ModelError(
                f"expected a (B, C, H, W) stage output for token_layout 'nchw', got {tuple(feat.shape)}"
            )
        b, c, h, w = feat.shape
        return feat.flatten(2).transpose(1, 2), (int(h), int(w))  # int(): constants when traced (ONNX)
    if layout == "nlc":
        if feat.dim() == 4:  # (B, H, W, C) maps are also accepted
            b, h, w, c = feat.shape
            return feat.reshape(b, h * w, c), (int(h), int(w))
        if feat.dim() != 3:
            raise ModelError(
                f"expected a (B, N, C) stage output for token_layout 'nlc', got {tuple(feat.shape)}"
            )
        n = int(feat.shape[1])
        gh, gw = math.ceil(input_hw[0] / reduction), math.ceil(input_hw[1] / reduction)
        if gh * gw == n:
            return feat, (gh, gw)
        side = math.isqrt(n)
        return feat, ((side, side) if side * side == n else None)
    raise ModelError(f"unknown token_layout {layout!r}; expected 'nchw' or 'nlc'")


def pooling_matrix(size: int, out: int) -> np.ndarray:
    """``(size, out)``: column i averages the inputs ``[floor(i size / out), ceil((i + 1) size / out))``,
    the windows of ``adaptive_avg_pool1d`` (numpy: a constant, not an operation, when traced)."""
    m = np.zeros((size, out), dtype=np.float32)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[start:end, i] = 1.0 / (end - start)
    return m


def _traced_pool(x: Tensor, grid: Grid, target: Grid, size: int) -> Tensor:
    """Adaptive average pooling of ``x`` ``(B, F, N)`` as a matrix product: the same numbers, for the ONNX
    exporter, which cannot pool to a size that does not divide the input."""
    if grid is not None and target is not None:
        m = np.kron(pooling_matrix(grid[0], target[0]), pooling_matrix(grid[1], target[1]))
    else:
        m = pooling_matrix(int(x.shape[-1]), size)
    return x @ torch.from_numpy(m).to(x.dtype)


def resize_tokens(tokens: Tensor, grid: Grid, size: int, target_grid: Grid, *, pool: bool) -> Tensor:
    """Resize tokens ``(B, N, F)`` to ``size`` tokens laid out as ``target_grid``.

    ``pool=False``: bilinear / linear interpolation (top-down upsampling); ``pool=True``: adaptive
    average pooling (bottom-up downsampling).
    """
    if tokens.shape[1] == size and grid == target_grid:
        return tokens
    b, _, f = tokens.shape
    x = tokens.transpose(1, 2)
    if pool and torch.jit.is_tracing():
        return _traced_pool(x, grid, target_grid, size).transpose(1, 2)
    if grid is not None and target_grid is not None:
        x = x.reshape(b, f, *grid)
        if pool:
            x = F.adaptive_avg_pool2d(x, target_grid)
        else:
            x = F.interpolate(x, size=target_grid, mode="bilinear", align_corners=False)
        x = x.flatten(2)
    elif pool:
        x = F.adaptive_avg_pool1d(x, size)
    else:
        x = F.interpolate(x, size=size, mode="linear", align_corners=False)
    return x.transpose(1, 2)


class FeatureFusion(nn.Module):
    """Projection to width F, top-down (FPN) and bottom-up (PANet) paths (METHODS.md §3).

    ``forward`` returns ``(top_down, bottom_up)`` lists of ``(B, N_i, F)``; with ``top_down=False``
    the top-down list is the projections, with ``bottom_up=False`` the bottom-up list is ``None``.
    Bottom-up: ``b_1 = Q_1(t_1)``, ``b_i = Q_i(t_i) + W_i Down(b_{i-1})`` with ``Q_i`` the per-stage
    Linear - ReLU - Linear (F -> F) of the official code (identity when ``bottom_up_proj=False``).
    """

    def __init__(
        self,
        in_channels: list[int],
        fpn_size: int,
        *,
        top_down: bool = True,
        bottom_up: bool = True,
        bottom_up_proj: bool = True,
    ):
        super().__init__()
        # Official projection: Linear - ReLU - Linear per stage (a 1x1 conv on CNN maps).
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, fpn_size)) for c in in_channels
        )
        self.top_down = top_down
        self.bottom_up = bottom_up
        n = len(in_channels)
        self.down = nn.ModuleList(nn.Linear(fpn_size, fpn_size) for _ in range(n - 1)) if bottom_up else None
        self.bu_proj = (
            nn.ModuleList(
                nn.Sequential(nn.Linear(fpn_size, fpn_size), nn.ReLU(inplace=True), nn.Linear(fpn_size, fpn_size))
                for _ in range(n)
            )
            if bottom_up and bottom_up_proj
            else None
        )

    def forward(self, tokens: list[Tensor], grids: list[Grid]) -> tuple[list[Tensor], list[Tensor] | None]:
        sizes = [int(t.shape[1]) for t in tokens]
        td = [p(t) for p, t in zip(self.proj, tokens)]
        if self.top_down:
            for i in range(len(td) - 2, -1, -1):  # stage i += upsample(stage i+1)
                td[i] = td[i] + resize_tokens(td[i + 1], grids[i + 1], sizes[i], grids[i], pool=False)
        if not self.bottom_up:
            return td, None
        src = [q(t) for q, t in zip(self.bu_proj, td)] if self.bu_proj is not None else td
        bu = [src[0]]
        for i in range(1, len(td)):  # stage i += downsample(stage i-1)
            down = resize_tokens(bu[i - 1], grids[i - 1], sizes[i], grids[i], pool=True)
            bu.append(src[i] + self.down[i - 1](down))
        return td, bu


class TokenClassifier(nn.Module):
    """Per-token MLP: conv1x1 - BN - ReLU - conv1x1 to C classes; ``(B, N, F) -> (B, N, C)``.

    The 1x1 convolutions act on each token separately (kernel 1 along the sequence).
    """

    def __init__(self, fpn_size: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(fpn_size, fpn_size, 1),
            nn.BatchNorm1d(fpn_size),
            nn.ReLU(inplace=True),
            nn.Conv1d(fpn_size, num_classes, 1),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens.transpose(1, 2)).transpose(1, 2)

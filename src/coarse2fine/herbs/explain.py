"""Pictures of what a HERBS model looks at (``c2f explain``).

One PNG per image: the image; for each selected stage, the tokens the selector keeps (foreground
mask over the image); a class-activation heat map of the predicted class (the k2 per-token class
maps, each stage placed on the image and scaled to [0, 1], then averaged); the top-5 classes with
their probabilities in the title. Stages whose tokens have no 2-D grid (see ``fpn``) are skipped.

Each stage is drawn where its tokens lie: with stage stride r (``feature_info`` reduction), token
(i, j) covers rows [i r, (i + 1) r) and columns [j r, (j + 1) r) of the input, clipped to the image.
A grid may cover less than the image (a 3 x 3 grid at stride 8 on 28 px covers pixels 0-23): the
rest is NaN in the stage's map, greyed in the kept-token panels and left out of the heat map.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from coarse2fine.data import load_image as read_image
from coarse2fine.errors import DataError, ModelError


def stage_map(
    values: Tensor, grid: tuple[int, int], size: tuple[int, int], mode: str, stride: int | None = None
) -> Tensor:
    """Token values ``(N,)`` on ``grid`` -> ``(H, W)`` map of the image's pixels.

    With ``stride`` r, token (i, j) covers pixels [i r, (i + 1) r) x [j r, (j + 1) r) (clipped to the
    image) and pixels no token covers are NaN; ``mode``: ``nearest`` (one value per token) or
    ``bilinear`` (between token centres). Without a stride the grid is stretched over the image.
    """
    m = values.float().reshape(1, 1, *grid)
    cover = size if stride is None else (grid[0] * stride, grid[1] * stride)
    if mode == "nearest":
        m = F.interpolate(m, size=cover, mode="nearest")[0, 0]
    else:
        m = F.interpolate(m, size=cover, mode="bilinear", align_corners=False)[0, 0]
    out = torch.full(size, float("nan"))
    h, w = min(size[0], cover[0]), min(size[1], cover[1])
    out[:h, :w] = m[:h, :w]
    return out


def _display(image: Tensor) -> Tensor:
    """``(C, H, W)`` -> ``(H, W, 3)`` in [0, 1] (min-max scaled)."""
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img[:3].permute(1, 2, 0)


def class_activation(
    maps: Sequence[Tensor],
    grids: Sequence[Any],
    cls: int,
    size: tuple[int, int],
    strides: Sequence[int | None] | None = None,
) -> Tensor | None:
    """Mean over stages of the per-token logit of class ``cls``, each stage placed by ``stage_map``
    and scaled to [0, 1]; a pixel averages the stages that cover it (NaN where none does)."""
    layers = []
    for m, g, r in zip(maps, grids, strides or [None] * len(maps)):
        if g is None:
            continue
        a = stage_map(m[:, cls], g, size, "bilinear", r)
        lo, hi = a.nan_to_num(float("inf")).min(), a.nan_to_num(float("-inf")).max()
        layers.append((a - lo) / (hi - lo).clamp_min(1e-8))
    return torch.stack(layers).nanmean(0) if layers else None


def _atomic_savefig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class Panel:
    """One picture of the figure: ``image`` (H, W, 3) with an optional ``heat`` map (H, W) over it;
    for a stage's kept-token picture, ``tokens`` (H, W): 1 kept, 0 dropped, NaN where no token lies."""

    title: str
    image: Tensor
    heat: Tensor | None = None
    tokens: Tensor | None = None


def _kept_panel(name: str, grid: tuple[int, int], kept: Tensor, stride: int | None, shown: Tensor) -> Panel:
    mask = torch.zeros(grid[0] * grid[1])
    mask[kept.cpu()] = 1.0
    m = stage_map(mask, grid, (shown.shape[0], shown.shape[1]), "nearest", stride)
    covered = ~m.isnan()
    m0 = m.nan_to_num(0.0)
    over = shown * (0.35 + 0.65 * m0[..., None])
    over[..., 0] = torch.maximum(over[..., 0], 0.6 * m0)
    over[~covered] = 0.4 + 0.3 * shown[~covered]  # no token of this stage lies here: washed-out grey
    return Panel(f"{name}: kept {int(mask.sum())}/{mask.numel()}", over, tokens=m)


@torch.no_grad()
def explain_panels(
    model: Any, image: Tensor, classes: Sequence[str], *, display: Tensor | None = None, topk: int = 5
) -> tuple[list[Panel], list[tuple[str, float]]]:
    """The pictures ``explain_image`` draws, and the top-k ``(class, probability)`` pairs."""
    if not hasattr(model, "explain"):
        raise ModelError(f"c2f explain needs a HERBS model, got {type(model).__name__}")
    if image.dim() != 3:
        raise DataError(f"explain_image expects one image (C, H, W), got shape {tuple(image.shape)}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        info = model.explain(image.unsqueeze(0).to(device))
    finally:
        model.train(was_training)
    probs = info["probs"][0].float().cpu()
    if len(classes) != probs.numel():
        raise ModelError(f"model predicts {probs.numel()} classes but {len(classes)} class names were given")
    k = min(topk, probs.numel())
    top_p, top_i = probs.topk(k)
    top = [(str(classes[i]), float(p)) for p, i in zip(top_p.tolist(), top_i.tolist())]
    size = (image.shape[-2], image.shape[-1])
    shown = _display(display if display is not None else image)
    maps = [m[0].float().cpu() for m in info["maps"]]
    grids = info["grids"]
    strides = info.get("reductions") or [None] * len(grids)

    panels = [Panel("image", shown)]
    if info["kept_index"] is not None:
        for name, g, idx, r in zip(info["stage_names"], grids, info["kept_index"], strides):
            if g is not None:
                panels.append(_kept_panel(name, g, idx[0], r, shown))
    cam = class_activation(maps, grids, int(top_i[0]), size, strides)
    if cam is not None:
        panels.append(Panel(f"class map: {top[0][0]}", shown, heat=cam))
    return panels, top


def explain_image(
    model: Any,
    image: Tensor,
    classes: Sequence[str],
    path: str | Path,
    *,
    display: Tensor | None = None,
    topk: int = 5,
) -> list[tuple[str, float]]:
    """Draw the picture for one normalised image ``(C, H, W)`` into ``path`` (PNG).

    ``model`` is a ``HERBS``; ``display`` is the image to show (default: ``image`` min-max scaled).
    Returns the top-k ``(class, probability)`` pairs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, top = explain_panels(model, image, classes, display=display, topk=topk)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.imshow(panel.image.numpy())
        if panel.heat is not None:  # NaN (no stage covers the pixel) is drawn transparent
            ax.imshow(panel.heat.numpy(), cmap="jet", alpha=0.5)
        ax.set_title(panel.title, fontsize=8)
        ax.axis("off")
    fig.suptitle("  ".join(f"{c} {p:.1%}" for c, p in top), fontsize=9)
    try:
        _atomic_savefig(fig, Path(path))
    finally:
        plt.close(fig)
    return top


def load_image(
    path: str | Path,
    *,
    in_chans: int,
    size: int,
    scale: int | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """Read an image file for ``explain``: shortest side resized to ``scale`` (default ``size``),
    centre crop ``size``; returns (normalised image, image in [0, 1] for display).

    Decoded by ``coarse2fine.data.load_image``, the one image opener: a missing file, a directory, a
    corrupt file or one above the decompression-bomb limit (refused from its header) is a DataError
    naming the path."""
    from torchvision.transforms import v2

    img = read_image(path, mode="L" if in_chans == 1 else "RGB")
    to_float = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(scale or size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    shown = to_float(img)
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    return (shown - m) / s, shown

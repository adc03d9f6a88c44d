"""Pictures of what a HERBS model looks at (``c2f explain``).

One PNG per image: the image; for each selected stage, the tokens the selector keeps (foreground
mask over the image); a class-activation heat map of the predicted class (the k2 per-token class
maps, each stage resized to the image and scaled to [0, 1], then averaged); the top-5 classes with
their probabilities in the title. Stages whose tokens have no 2-D grid (see ``fpn``) are skipped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from coarse2fine.data import load_image as read_image
from coarse2fine.errors import DataError, ModelError


def _grid_map(values: Tensor, grid: tuple[int, int], size: tuple[int, int], mode: str) -> Tensor:
    """Token values ``(N,)`` on ``grid`` -> ``(H, W)`` image-sized map."""
    m = values.float().reshape(1, 1, *grid)
    if mode == "nearest":
        return F.interpolate(m, size=size, mode="nearest")[0, 0]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]


def _display(image: Tensor) -> Tensor:
    """``(C, H, W)`` -> ``(H, W, 3)`` in [0, 1] (min-max scaled)."""
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img[:3].permute(1, 2, 0)


def class_activation(
    maps: Sequence[Tensor], grids: Sequence[Any], cls: int, size: tuple[int, int]
) -> Tensor | None:
    """Mean over stages of the per-token logit of class ``cls``, each stage scaled to [0, 1]."""
    layers = []
    for m, g in zip(maps, grids):
        if g is None:
            continue
        a = _grid_map(m[:, cls], g, size, "bilinear")
        layers.append((a - a.min()) / (a.max() - a.min()).clamp_min(1e-8))
    return torch.stack(layers).mean(0) if layers else None


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


@torch.no_grad()
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
    kept = info["kept_index"]

    panels: list[tuple[str, Tensor, Tensor | None]] = [("image", shown, None)]
    if kept is not None:
        for name, g, idx in zip(info["stage_names"], grids, kept):
            if g is None:
                continue
            mask = torch.zeros(g[0] * g[1])
            mask[idx[0].cpu()] = 1.0
            m = _grid_map(mask, g, size, "nearest")
            over = shown * (0.35 + 0.65 * m[..., None])
            over[..., 0] = torch.maximum(over[..., 0], 0.6 * m)
            panels.append((f"{name}: kept {int(mask.sum())}/{mask.numel()}", over, None))
    cam = class_activation(maps, grids, int(top_i[0]), size)
    if cam is not None:
        panels.append((f"class map: {top[0][0]}", shown, cam))

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, img, heat) in zip(axes[0], panels):
        ax.imshow(img.numpy())
        if heat is not None:
            ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
        ax.set_title(title, fontsize=8)
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

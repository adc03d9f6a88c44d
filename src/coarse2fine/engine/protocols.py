"""VGG's test protocols and ConvNet fusion (METHODS.md §1 "Testing").

Images come at their native resolution, NCHW, uint8 (scaled to [0, 1]) or float; ``mean``/``std``
normalise them (leave them None when the loader already normalised; normalising before or after
the bilinear resize is the same, both being linear). Each view's
softmax (of the logits, or of a dict output's ``"logits"``: HD-CNN, HERBS) is averaged per image;
fused models average their per-model results.

| protocol | views per image and scale | default scales |
|---|---|---|
| ``center`` | resize shortest side to Q, centre crop: 1 (2 with flip) | [Q] |
| ``dense`` | ``to_dense()`` on the whole resized image, score map averaged: 1 (2 with flip) | [Q] |
| ``multicrop`` | 5x5 grid of crops (x2 flips): 25 (50) | multi-scale set |
| ``multiscale`` | ``dense`` at every scale (centre crops for models without ``to_dense``) | multi-scale set |
| ``dense+multicrop`` | mean of the ``dense`` and ``multicrop`` softmax | multi-scale set |

Q (``test_scale``) defaults to S for a fixed training scale, (S_min+S_max)/2 for a jittered one,
and the crop size when no training scale is given (small images). The multi-scale set is
{S-32, S, S+32} (fixed S) or {S_min, (S_min+S_max)/2, S_max} (jittered). For small images,
where S-32 would fall below the crop, the offsets are ±S/8 around Q = max(S, crop + S/8), so that
no scale is below the crop (28x28 Fashion-MNIST: {28, 31, 34}; 32x32 CIFAR: {32, 36, 40}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from coarse2fine.config import quote
from coarse2fine.engine.objective import logits_of
from coarse2fine.errors import ConfigError, ModelError

PROTOCOLS = ("center", "dense", "multicrop", "multiscale", "dense+multicrop")


class Fusion(nn.Module):
    """ConvNet fusion of trained models as one model (METHODS.md eq. (4)): the log of the mean of their
    softmax (of the logits, or of a dict output's ``"logits"``), in fp32 under autocast, so that any
    evaluator that takes logits (arg max, softmax) sees the fused prediction."""

    def __init__(self, *models: nn.Module) -> None:
        super().__init__()
        if not models:
            raise ModelError("Fusion needs at least one model")
        self.models = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([torch.softmax(logits_of(m(x)).float(), 1) for m in self.models]).mean(0)
        return probs.clamp_min(1e-12).log()
GRID = 5


class ProtocolResult(NamedTuple):
    probs: np.ndarray  # (N, C) averaged softmax
    targets: np.ndarray  # (N,) int64
    views: int  # forward views per image and model


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown test protocol {quote(protocol)}; valid: {', '.join(PROTOCOLS)}")


def default_scales(crop: int, train_scale: Sequence[int] | None = None) -> list[int]:
    """Multi-scale Q set of METHODS.md §1 (see the module docstring for small images)."""
    if train_scale is not None and len(train_scale) == 2:
        lo, hi = int(train_scale[0]), int(train_scale[1])
        return [lo, (lo + hi) // 2, hi]
    s = int(train_scale[0]) if train_scale else crop
    if s - 32 >= crop:
        return [s - 32, s, s + 32]
    step = max(1, s // 8)
    q = max(s, crop + step)
    return [q - step, q, q + step]


def default_test_scale(crop: int, train_scale: Sequence[int] | None = None) -> int:
    """Q of single-scale testing: S, or (S_min + S_max) / 2, or the crop for small images."""
    if not train_scale:
        return crop
    return int(train_scale[0]) if len(train_scale) == 1 else (int(train_scale[0]) + int(train_scale[1])) // 2


def resize_shortest(images: Tensor, q: int) -> Tensor:
    """Bilinear (antialiased) resize so that the shortest side is ``q``."""
    h, w = images.shape[-2:]
    if min(h, w) == q:
        return images
    size = (q, max(q, round(w * q / h))) if h <= w else (max(q, round(h * q / w)), q)
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def crop_positions(size: int, crop: int, n: int = GRID) -> list[int]:
    return [round(float(p)) for p in np.linspace(0, size - crop, n)]


def _crop_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model, "default_input_size", None)
    if size is None:
        raise ModelError(f"{type(model).__name__} has no default_input_size: the crop size is unknown")
    return int(size[-2]), int(size[-1])


class _Runner:
    """One model prepared for the protocols: its crop size and (lazily) its dense copy."""

    def __init__(self, model: nn.Module, max_batch: int) -> None:
        self.model = model
        self.crop = _crop_size(model)
        self.max_batch = max_batch
        self._dense: nn.Module | None = None

    @property
    def dense(self) -> nn.Module:
        if self._dense is None:
            if not hasattr(self.model, "to_dense"):
                raise ModelError(
                    f"{type(self.model).__name__} has no to_dense(): the dense protocols need a fully "
                    "convolutional model (VGG, NIN); use center or multicrop"
                )
            self._dense = self.model.to_dense().eval()
        return self._dense

    def _softmax(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return torch.cat([logits_of(fn(c)).float().softmax(1) for c in x.split(self.max_batch)])

    def crops(self, x: Tensor, q: int, grid: int, flip: bool) -> tuple[Tensor, int]:
        """Sum of the softmax over a grid x grid set of crops (1: centre crop) and their flips."""
        img = resize_shortest(x, q)
        (ch, cw), (h, w) = self.crop, img.shape[-2:]
        if grid == 1:
            ys, xs = [(h - ch) // 2], [(w - cw) // 2]
        else:
            ys, xs = crop_positions(h, ch, grid), crop_positions(w, cw, grid)
        specs = [(y, x0, False) for y in ys for x0 in xs]
        if flip:
            specs += [(y, x0, True) for y, x0, _ in specs]
        b = x.shape[0]
        per_chunk = max(1, self.max_batch // b)  # views per forward: memory stays ~max_batch images
        total = None
        for i in range(0, len(specs), per_chunk):
            chunk = [img[..., y : y + ch, x0 : x0 + cw] for y, x0, _ in specs[i : i + per_chunk]]
            chunk = [v.flip(-1) if f else v for v, (_, _, f) in zip(chunk, specs[i : i + per_chunk])]
            part = self._softmax(self.model, torch.cat(chunk)).view(len(chunk), b, -1).sum(0)
            total = part if total is None else total + part
        assert total is not None
        return total, len(specs)

    def dense_views(self, x: Tensor, q: int, flip: bool) -> tuple[Tensor, int]:
        img = resize_shortest(x, q)
        fn = lambda t: self.dense(t).mean((2, 3))
        probs = self._softmax(fn, img)
        if flip:
            probs = probs + self._softmax(fn, img.flip(-1))
        return probs, 2 if flip else 1


def protocol_probs(
    runner: _Runner, images: Tensor, protocol: str, scales: Sequence[int], flip: bool
) -> tuple[Tensor, int]:
    """Mean softmax (B, C) of one model under ``protocol`` and the number of views per image."""
    total, views = None, 0

    def add(p: Tensor, n: int) -> None:
        nonlocal total, views
        total = p if total is None else total + p
        views += n

    for q in scales:
        if protocol == "center" or (protocol == "multiscale" and not hasattr(runner.model, "to_dense")):
            add(*runner.crops(images, q, 1, flip))
        elif protocol in ("dense", "multiscale"):
            add(*runner.dense_views(images, q, flip))
        elif protocol == "multicrop":
            add(*runner.crops(images, q, GRID, flip))
    if protocol == "dense+multicrop":
        dense, nd = protocol_probs(runner, images, "dense", scales, flip)
        crops, nc = protocol_probs(runner, images, "multicrop", scales, flip)
        return (dense + crops) / 2, nd + nc
    assert total is not None
    return total / views, views


def _prepare(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, device: torch.device) -> Tensor:
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def _resolve_scales(
    runners: list[_Runner], protocol: str, scales: Sequence[int] | None,
    train_scale: Sequence[int] | None, test_scale: int | None,
) -> list[int]:
    crop = max(max(r.crop) for r in runners)
    if scales is None:
        if protocol in ("center", "dense"):
            scales = [test_scale or default_test_scale(crop, train_scale)]
        else:
            scales = default_scales(crop, train_scale)
    scales = [int(q) for q in scales]
    if not scales:
        raise ConfigError("eval.scales: at least one test scale Q is needed")
    for r in runners:
        if min(scales) < min(r.crop):
            raise ConfigError(
                f"eval.scales: test scale {min(scales)} is smaller than the crop {r.crop} of "
                f"{type(r.model).__name__}; every Q must be at least the crop size (--set eval.scales=[{max(r.crop)}])"
            )
    return scales


_VIEW_DEFAULTS: dict[str, Any] = {
    "scales": None,
    "train_scale": None,
    "test_scale": None,
    "flip": True,
    "mean": None,
    "std": None,
    "max_batch": 256,
}


def predict_views(
    models: nn.Module | Sequence[nn.Module],
    images: Tensor | Sequence[Tensor],
    protocol: str = "center",
    *,
    scales: Sequence[int] | None = None,
    train_scale: Sequence[int] | None = None,
    test_scale: int | None = None,
    flip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_batch: int = 256,
) -> tuple[Tensor, int]:
    """Softmax (B, C) of a batch under ``protocol``, averaged over views and over ``models`` (fusion).

    Models run in eval mode (restored afterwards).
    ``images``: a tensor (B, C, H, W) or a list of (C, H, W) of any sizes (grouped by size).
    Returns the probabilities on the CPU and the views per image per model.
    """
    model_list, runners, q = _setup(models, protocol, scales, train_scale, test_scale, max_batch)
    with _eval_mode(model_list):
        return _predict(runners, images, protocol, q, flip, mean, std)


def _setup(
    models: nn.Module | Sequence[nn.Module], protocol: str, scales: Sequence[int] | None,
    train_scale: Sequence[int] | None, test_scale: int | None, max_batch: int,
) -> tuple[list[nn.Module], list[_Runner], list[int]]:
    """Checked protocol, the model list, one runner per model and the resolved scales."""
    check_protocol(protocol)
    model_list = [models] if isinstance(models, nn.Module) else list(models)
    if not model_list:
        raise ModelError("protocol: no model given")
    runners = [_Runner(m, max_batch) for m in model_list]
    return model_list, runners, _resolve_scales(runners, protocol, scales, train_scale, test_scale)


@contextmanager
def _eval_mode(models: list[nn.Module]) -> Iterator[None]:
    """Models in eval mode for the duration, then back to their own modes."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.inference_mode()
def _predict(
    runners: list[_Runner], images: Tensor | Sequence[Tensor], protocol: str, scales: list[int], flip: bool,
    mean: Sequence[float] | None, std: Sequence[float] | None,
) -> tuple[Tensor, int]:
    device = next(runners[0].model.parameters()).device
    if isinstance(images, Tensor):
        groups = {tuple(images.shape[-2:]): (list(range(images.shape[0])), images)}
    else:
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape[-2:]), []).append(i)
        groups = {k: (idx, torch.stack([images[i] for i in idx])) for k, idx in by_size.items()}
    n = sum(len(idx) for idx, _ in groups.values())
    out: Tensor | None = None
    views = 0
    for idx, batch in groups.values():
        x = _prepare(batch, mean, std, device)
        fused = None
        for r in runners:
            p, views = protocol_probs(r, x, protocol, scales, flip)
            fused = p if fused is None else fused + p
        assert fused is not None
        fused = (fused / len(runners)).cpu()
        if out is None:
            out = torch.zeros(n, fused.shape[1])
        out[idx] = fused
    assert out is not None
    return out, views


def evaluate_protocol(
    models: nn.Module | Sequence[nn.Module],
    batches: Iterable[tuple[Tensor | Sequence[Tensor], Tensor]],
    protocol: str = "center",
    *,
    progress: bool = False,
    **settings: Any,
) -> ProtocolResult:
    """Run ``protocol`` over a loader (or any iterable of ``(images, targets)``) with one or more models.

    ``settings``: the keyword arguments of :func:`predict_views` (scales, train_scale, test_scale, flip,
    mean, std, max_batch). Models are put in eval mode (and restored). Returns ``(probs (N, C),
    targets (N,), views)`` as numpy, so the engine's metrics apply; for fusion ``probs`` is the mean
    over the models. ``progress`` shows a tqdm bar.
    """
    s = {**_VIEW_DEFAULTS, **settings}
    unknown = sorted(set(settings) - set(_VIEW_DEFAULTS))
    if unknown:
        raise TypeError(f"evaluate_protocol: unknown setting(s) {unknown}")
    model_list, runners, q = _setup(models, protocol, s["scales"], s["train_scale"], s["test_scale"], s["max_batch"])
    probs, targets, views = [], [], 0
    with _eval_mode(model_list):
        for images, labels in tqdm(batches, desc=protocol, disable=not progress, leave=False):
            p, views = _predict(runners, images, protocol, q, s["flip"], s["mean"], s["std"])
            probs.append(p.numpy())
            targets.append(torch.as_tensor(labels).cpu().numpy().astype(np.int64))
    if not probs:
        raise ModelError("protocol: the loader gave no batches")
    return ProtocolResult(np.concatenate(probs), np.concatenate(targets), views)


def collate_list(batch: Sequence[tuple[Tensor, int]]) -> tuple[list[Tensor], Tensor]:
    """DataLoader ``collate_fn`` for images of different sizes (dense testing on native images)."""
    return [im for im, _ in batch], torch.as_tensor([int(t) for _, t in batch])

"""Predictions of a trained model for image files: each file read in the model's colour mode and
fed through the eval transform the model was validated with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from coarse2fine.data import load_image
from coarse2fine.engine.objective import logits_of
from coarse2fine.errors import DataError
from coarse2fine.recipes.trained import Trained


def read_image_tensor(path: str, channels: int) -> torch.Tensor:
    """An image file as a uint8 (C, H, W) tensor in the model's colour mode."""
    if not Path(path).exists():  # a directory, a corrupt file: load_image names what it is
        raise DataError(f"image {path!r} does not exist")
    img = load_image(path, mode="L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


@torch.inference_mode()
def predict_images(trained: Trained, paths: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    """For each file, the ``topk`` (class, probability) pairs, most likely first."""
    facts = trained.facts
    transform = trained.eval_transform()
    out = []
    for p in paths:
        img = read_image_tensor(p, facts.in_chans)
        # in-memory datasets use a batched transform (uint8 batch in), file datasets a per-image one
        x = transform(img[None]) if facts.in_memory else transform(img)[None]
        probs = torch.softmax(logits_of(trained.model(x)).float(), dim=1)[0]
        vals, idx = probs.topk(min(topk, probs.numel()))
        out.append([(trained.classes[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())])
    return out

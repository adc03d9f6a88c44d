"""What a trained HERBS model looks at (METHODS.md §3): for each image, the kept tokens of every
stage, the class map of the predicted class and the top classes, drawn into a PNG."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from coarse2fine.data import eval_scale
from coarse2fine.errors import CheckpointError
from coarse2fine.herbs import HERBS
from coarse2fine.herbs.explain import explain_image, load_image
from coarse2fine.recipes.trained import load_trained


def picture_names(images: list[str]) -> list[str]:
    """The PNG name of each image: ``<stem>.png``, or ``<stem>_<8 hex digits of a hash of its path>.png``
    when other images share the stem (``a/cat.jpg`` and ``b/cat.png``), so no picture overwrites another."""
    stems = [Path(p).stem for p in images]
    shared = Counter(stems)
    names = []
    for path, stem in zip(images, stems):
        if shared[stem] > 1:
            stem = f"{stem}_{hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:8]}"
        names.append(f"{stem}.png")
    return names


def explain_images(
    checkpoint: str, images: list[str], out_dir: str | Path, *, device: str = "cpu", topk: int = 5
) -> Iterator[tuple[str, Path, list[tuple[str, float]]]]:
    """Yields (image, picture written, top-k (class, probability)) for each image (named by ``picture_names``)."""
    trained = load_trained(checkpoint)
    model, cfg, facts = trained.model, trained.cfg, trained.facts
    if not isinstance(model, HERBS):
        raise CheckpointError(f"checkpoint {checkpoint!r} holds a {cfg.method!r} model; c2f explain needs method herbs")
    model.to(torch.device(device)).eval()
    size = facts.image_size
    scale = None if facts.in_memory else eval_scale(cfg.data.train_scale, cfg.data.test_scale, size)
    for image_path, name in zip(images, picture_names(images)):
        image, shown = load_image(
            image_path, in_chans=facts.in_chans, size=size, scale=scale, mean=facts.mean, std=facts.std
        )
        target = Path(out_dir) / name
        top = explain_image(model, image, trained.classes, target, display=shown, topk=topk)
        yield image_path, target, top

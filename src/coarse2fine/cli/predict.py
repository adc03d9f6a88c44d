"""``c2f predict``: the top classes with probabilities for image files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coarse2fine.data import load_image
from coarse2fine.engine.objective import logits_of
from coarse2fine.errors import DataError
from coarse2fine.recipes import Trained, load_trained


def read_image_tensor(path: str, channels: int) -> torch.Tensor:
    """An image file as a uint8 (C, H, W) tensor in the model's colour mode."""
    if not Path(path).is_file():
        raise DataError(f"image {path!r} does not exist")
    img = load_image(path, mode="L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


@torch.inference_mode()
def predict_images(trained: Trained, paths: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    facts = trained.facts
    transform = trained.eval_transform()
    out = []
    for p in paths:
        img = read_image_tensor(p, facts.in_chans)
        # in-memory datasets use a batched transform (uint8 batch in), file datasets a per-image one
        x = transform(img[None]) if facts.in_memory else transform(img)[None]
        probs = torch.softmax(logits_of(trained.model(x)).float(), dim=1)[0]
        k = min(topk, probs.numel())
        vals, idx = probs.topk(k)
        out.append([(trained.classes[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())])
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    trained = load_trained(args.checkpoint)
    results = predict_images(trained, args.images, args.topk)
    if args.json:
        ranked = {p: [{"class": c, "probability": v} for c, v in r] for p, r in zip(args.images, results)}
        print(json.dumps(ranked, indent=2))
        return 0
    for path, ranked in zip(args.images, results):
        print(path)
        for cls, prob in ranked:
            print(f"  {prob:7.2%}  {cls}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("predict", help="top-5 classes with probabilities for image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

"""``c2f explain IMAGE... --checkpoint CKPT [--out DIR]``: what a trained HERBS model looks at."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from coarse2fine.errors import CheckpointError
from coarse2fine.herbs import HERBS
from coarse2fine.herbs.explain import explain_image, load_image
from coarse2fine.recipes import load_trained


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="HERBS: draw kept tokens, class map and top-5 classes for images",
        description="For each image, write <out>/<image stem>.png: the image, the tokens HERBS' selector "
        "keeps at each stage, the class-activation map of the predicted class, and the top-5 classes.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--checkpoint", required=True, help="a HERBS checkpoint written by c2f train")
    p.add_argument("--out", default="explain", help="folder for the PNG files (default: ./explain)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--topk", type=int, default=5, help="classes listed in the title (default: 5)")
    p.set_defaults(func=run_explain)


def eval_scale(train_scale: list[int] | None, test_scale: int | None, size: int) -> int:
    """The evaluation resize Q of a file dataset, as ``data.build_transforms`` chooses it."""
    if test_scale is not None:
        return test_scale
    scale = list(train_scale) if train_scale else [round(size * 256 / 224)]
    return scale[0] if len(scale) == 1 else (scale[0] + scale[-1]) // 2


def run_explain(args: argparse.Namespace) -> int:
    trained = load_trained(args.checkpoint)
    model, cfg, facts = trained.model, trained.cfg, trained.facts
    if not isinstance(model, HERBS):
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} holds a {cfg.method!r} model; c2f explain needs method herbs"
        )
    model.to(torch.device(args.device)).eval()
    size = facts.image_size
    scale = None if facts.in_memory else eval_scale(cfg.data.train_scale, cfg.data.test_scale, size)
    out_dir = Path(args.out)
    for image_path in args.images:
        image, shown = load_image(
            image_path, in_chans=facts.in_chans, size=size, scale=scale, mean=facts.mean, std=facts.std
        )
        target = out_dir / f"{Path(image_path).stem}.png"
        top = explain_image(model, image, trained.classes, target, display=shown, topk=args.topk)
        print(f"{image_path} -> {target}: " + ", ".join(f"{name} {p:.1%}" for name, p in top))
    return 0

"""``c2f explain IMAGE... --checkpoint CKPT [--out DIR]``: what a trained HERBS model looks at."""

from __future__ import annotations

import argparse
from typing import Any

from coarse2fine.recipes.explain import explain_images


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="HERBS: draw kept tokens, class map and top-5 classes for images",
        description="For each image, write <out>/<image stem>.png (<stem>_<hash of its path>.png where images "
        "share a stem): the image, the tokens HERBS' selector keeps at each stage, the class-activation map "
        "of the predicted class, and the top-5 classes.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--checkpoint", required=True, help="a HERBS checkpoint written by c2f train")
    p.add_argument("--out", default="explain", help="folder for the PNG files (default: ./explain)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--topk", type=int, default=5, help="classes listed in the title (default: 5)")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    pictures = explain_images(args.checkpoint, args.images, args.out, device=args.device, topk=args.topk)
    for image, picture, top in pictures:
        print(f"{image} -> {picture}: " + ", ".join(f"{name} {p:.1%}" for name, p in top))
    return 0

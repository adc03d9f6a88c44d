"""``c2f explain IMAGE... --checkpoint CKPT [--out DIR]``: what a trained HERBS model looks at."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from coarse2fine.errors import C2FError, CheckpointError

log = logging.getLogger(__name__)

STATS_KEYS = ("stats", "normalization", "normalisation", "data_stats")


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


def _find_stats(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """Normalisation statistics stored with the checkpoint (top level or in its metadata)."""
    places = [checkpoint, checkpoint.get("metadata") or {}]
    for place in places:
        for key in STATS_KEYS:
            value = place.get(key) if isinstance(place, dict) else None
            if isinstance(value, dict) and "mean" in value and "std" in value:
                return value
    return None


def eval_scale(train_scale: list[int] | None, test_scale: int | None, size: int) -> int:
    """The evaluation resize Q of a file dataset, as ``data.build_transforms`` chooses it."""
    if test_scale is not None:
        return test_scale
    scale = list(train_scale) if train_scale else [round(size * 256 / 224)]
    return scale[0] if len(scale) == 1 else (scale[0] + scale[-1]) // 2


def run_explain(args: argparse.Namespace) -> int:
    import torch

    from coarse2fine.herbs.explain import explain_image, load_image

    if not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {args.checkpoint!r} does not exist")
    try:
        from coarse2fine.build import load_trained
    except ImportError as exc:  # the integration layer is missing from this installation
        raise C2FError(f"c2f explain needs coarse2fine.build.load_trained: {exc}") from exc
    trained = load_trained(args.checkpoint)
    model, cfg = trained.model, trained.cfg
    if not hasattr(model, "explain"):
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} holds a {cfg.method!r} model; c2f explain needs method herbs"
        )
    model.to(torch.device(args.device)).eval()
    c, h, _ = model.input_size
    md = trained.checkpoint.get("metadata") or {}
    stats = _find_stats(trained.checkpoint)
    if stats is None:
        log.warning("no normalisation statistics in %s; using mean 0.5, std 0.5", args.checkpoint)
        stats = {"mean": [0.5] * c, "std": [0.5] * c}
    size = int(md.get("image_size") or cfg.data.image_size or h)
    scale = None if md.get("in_memory") else eval_scale(cfg.data.train_scale, cfg.data.test_scale, size)
    out_dir = Path(args.out)
    for image_path in args.images:
        image, shown = load_image(
            image_path,
            in_chans=c,
            size=size,
            scale=scale,
            mean=stats["mean"],
            std=stats["std"],
        )
        target = out_dir / f"{Path(image_path).stem}.png"
        top = explain_image(model, image, trained.classes, target, display=shown, topk=args.topk)
        print(f"{image_path} -> {target}: " + ", ".join(f"{name} {p:.1%}" for name, p in top))
    return 0

"""``c2f predict``: the top classes with probabilities for image files."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coarse2fine.recipes import load_trained
from coarse2fine.recipes.predict import predict_images


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

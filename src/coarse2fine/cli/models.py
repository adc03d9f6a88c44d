"""``c2f models``: every model with its parameter count and FLOPs at the default input size."""

from __future__ import annotations

import argparse
from typing import Any

from coarse2fine.models import list_models, model_summary


def cmd_models(args: argparse.Namespace) -> int:
    names = [n for n in list_models() if not args.filter or args.filter in n]
    if args.timm:
        names += [f"timm/{n}" for n in args.timm]
    print(f"{'model':<24} {'params':>14} {'GFLOPs':>10}  input (C,H,W)")
    for name in names:
        s = model_summary(name, num_classes=args.num_classes)
        print(f"{name:<24} {s['params']:>14,} {s['flops'] / 1e9:>10.3f}  {tuple(s['input_size'])}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("models", help="list models with parameter count and FLOPs at the default input size")
    p.add_argument("--filter", help="only names containing this text")
    p.add_argument("--timm", nargs="*", default=[], help="also show these timm models")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=cmd_models)

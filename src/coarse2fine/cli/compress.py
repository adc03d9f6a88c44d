"""``c2f compress``: product-quantise a trained model's layers (METHODS.md §2.4).

Each chosen layer's weight (conv flattened to out x in*kh*kw) is split into column segments of width s,
k-means with k centres per segment, uint8 codes + fp32 centres (METHODS.md §2.4); axis 'columns' quantises the
transposed weight instead (better for layers with few rows). Saves a checkpoint whose metadata names the
compressed layers.
"""

from __future__ import annotations

import argparse
from typing import Any

from coarse2fine.cli.common import checkpoint_verb
from coarse2fine.recipes.compress import CompressRequest, compress_checkpoint

HELP = "product-quantise a trained model's layers (HD-CNN compression)"


def register(subparsers: Any) -> None:
    c = checkpoint_verb(subparsers, "compress", HELP, __doc__, "a training checkpoint")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME=S:K[:AXIS]",
        help="layers to compress, e.g. classifier.0=14:64 classifier.3=4:256:columns",
    )
    which.add_argument("--auto", action="store_true", help="every Linear (s=4) and kxk Conv2d (s=3) worth compressing")
    c.add_argument(
        "--axis",
        choices=("rows", "columns", "auto"),
        default="rows",
        help="--auto: cluster the weight's row segments (METHODS.md), its column segments (W^T), or per layer "
        "the longer side (default: rows)",
    )
    c.add_argument("--linear", default=None, metavar="S:K", help="--auto: s and largest k of Linear layers (4:256)")
    c.add_argument("--conv", default=None, metavar="S:K", help="--auto: s and largest k of kxk convs (3:128)")
    c.add_argument(
        "--rear",
        action="store_true",
        help="HD-CNN with --auto: only the coarse and fine components (the shared layers stay fp32)",
    )
    c.add_argument("--out", default=None, help="compressed checkpoint (default: <checkpoint>_pq.pt beside it)")
    c.add_argument("--eval", action="store_true", help="test-split accuracy before and after")
    c.add_argument("--seed", type=int, default=0, help="k-means seed")
    c.add_argument(
        "--backend",
        choices=("sklearn", "torch"),
        default="sklearn",
        help="k-means: scikit-learn per segment, or batched torch (fast for big layers, uses the GPU)",
    )
    c.set_defaults(func=run_compress)


def _print_hdcnn_compression(result: dict[str, Any]) -> None:
    rows = ["| part | layer | shape | axis | s | k | factor | rel. error |", "|---|---|---|---|---:|---:|---:|---:|"]
    sections = [("shared", result["shared_layers"]), ("coarse", result["coarse_component"])]
    sections += [(f"fine {r.get('component', k)}", r) for k, r in enumerate(result["fine_components"])]
    for part, rep in sections:
        for r in (rep or {}).get("layers", []):
            rows.append(
                f"| {part} | {r['name']} | {'x'.join(map(str, r['shape']))} | {r['axis']} | {r['s']} | {r['k']} | "
                f"{r['factor']:.2f}x | {r['rel_error']:.4f} |"
            )
    print("\n".join(rows))
    print(
        f"\nrear layers (coarse + fine components): {result['rear_bytes_before']:,} -> "
        f"{result['rear_bytes_after']:,} bytes ({result['rear_factor']:.2f}x smaller)"
    )


def run_compress(args: argparse.Namespace) -> int:
    same = ("axis", "linear", "conv", "rear", "out", "seed", "backend", "overrides")  # option = request field
    req = CompressRequest(
        args.checkpoint,
        layers=None if args.auto else args.layers,
        evaluate=args.eval,
        progress=not args.quiet,
        **{name: getattr(args, name) for name in same},
    )
    result = compress_checkpoint(req)
    if isinstance(result.report, dict):
        _print_hdcnn_compression(result.report)
    else:
        print(result.report.table())
    before, after = result.bytes_before, result.bytes_after
    print(f"\nmodel: {before:,} -> {after:,} bytes ({before / max(after, 1):.2f}x smaller)")
    if result.accuracy:
        b, a = result.accuracy["before"], result.accuracy["after"]
        print(
            f"test top-1: {100 * b['top1']:.2f} % -> {100 * a['top1']:.2f} %; "
            f"top-5: {100 * b['top5']:.2f} % -> {100 * a['top5']:.2f} %"
        )
    print(f"compressed checkpoint: {result.out}")
    return 0

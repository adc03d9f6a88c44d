"""``c2f eval``: checkpoint(s) on the test (or held-out) split with a VGG test protocol; several
checkpoints are fused (their softmax averaged, METHODS.md §1)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from coarse2fine.cli.common import add_quiet, add_set, pct
from coarse2fine.config import with_overrides
from coarse2fine.engine import evaluate, save_eval_artifacts
from coarse2fine.engine.checkpoint import check_classes
from coarse2fine.engine.protocols import PROTOCOLS
from coarse2fine.recipes import build_datasets, eval_loader, evaluate_protocol_on, load_trained


def cmd_eval(args: argparse.Namespace) -> int:
    trained = [load_trained(p) for p in args.checkpoint]
    first = trained[0]
    for t in trained[1:]:
        check_classes(t.classes, first.classes, f"checkpoint {str(t.path)!r}", other=f"checkpoint {str(first.path)!r}")
    cfg = with_overrides(first.cfg, args.overrides)
    bundle = build_datasets(cfg, run_dir=first.run_dir, progress=not args.quiet)
    check_classes(first.classes, bundle.classes, f"checkpoint {str(first.path)!r}", other=f"dataset {cfg.data.name!r}")
    dataset = {"test": bundle.test, "val": bundle.val}[args.split]
    out = Path(args.out) if args.out else first.path.parent.parent / "eval"
    protocol = args.protocol or cfg.eval.protocol
    start = time.perf_counter()
    if protocol == "center" and len(trained) == 1:
        loader = eval_loader(cfg, dataset, first.eval_transform())
        result = evaluate(first.model, loader, num_classes=len(first.classes), progress=not args.quiet, desc=args.split)
        views = 1
    else:
        result, views = evaluate_protocol_on(
            [t.model for t in trained],
            cfg,
            dataset,
            protocol,
            first.facts.data_stats,
            len(first.classes),
            scales=args.scales or cfg.eval.scales,
            flip=cfg.eval.flip and not args.no_flip,
        )
    seconds = time.perf_counter() - start
    paths = save_eval_artifacts(result, out, first.classes, prefix=f"{args.split}_{protocol.replace('+', '_')}")
    print(f"{args.split} ({result.num_samples} images), protocol {protocol}, {len(trained)} model(s), {views} view(s)")
    print(f"  top-1 {pct(result.top1)}  top-5 {pct(result.top5)}  error {100 * (1 - result.top1):.2f}%")
    print(f"  {1000 * seconds / max(1, result.num_samples):.2f} ms per image")
    print(f"  wrote {paths['metrics']} and {paths['confusion_png']}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoint(s) with a VGG test protocol; several = fusion")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint (repeat to fuse models)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default: the recipe's eval.protocol")
    p.add_argument("--scales", type=int, nargs="+", help="test scales Q (shortest side)")
    p.add_argument("--no-flip", action="store_true", help="do not average with horizontally flipped images")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    add_set(p, "a value of the checkpoint's config, e.g. data.root=/data")
    add_quiet(p)
    p.set_defaults(func=cmd_eval)

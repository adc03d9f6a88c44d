"""``c2f train``: train a model from a YAML recipe, then evaluate it on the test split."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from coarse2fine.cli.common import add_config, add_quiet, pct, resolve_config
from coarse2fine.engine import distributed as du
from coarse2fine.recipes import RunCheck, RunReport, check_run, train_run


def resume_hint(args: argparse.Namespace) -> str:
    """The command that resumes this run (the same launcher: ``c2f`` or ``torchrun``)."""
    launcher = ["c2f"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}", "-m", "coarse2fine"]
    return " ".join([*launcher, "train", *sys.argv[2:]] + ([] if args.resume else ["--resume"]))


def cmd_train(args: argparse.Namespace) -> int:
    extra = []
    if args.name:
        extra.append(f"name={args.name}")
    if args.init_from:
        extra.append(f"model.init_from={args.init_from}")
    if args.pretrained_file:
        extra.append(f"model.pretrained_file={args.pretrained_file}")
    cfg = resolve_config(args, extra)
    if args.check:
        print_check(check_run(cfg, resume=args.resume, overwrite=args.overwrite))
        return 0
    report = train_run(
        cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, resume_hint=resume_hint(args)
    )
    if du.is_main_process():
        print_run_report(report)
    return 0


def print_check(check: RunCheck) -> None:
    """What ``--check`` accepted (rank 0)."""
    if not du.is_main_process():
        return
    images = ", ".join(f"{n} {split}" for split, n in check.images.items())
    print(f"ok: {check.classes} classes ({images} images); model {check.model} ({check.parameters:,} parameters)")
    print(f"  {check.run_dir}: would {check.decision}; nothing was written")


def print_run_report(report: RunReport) -> None:
    print(f"\nrun: {report.run_dir}")
    print(f"  best epoch {report.best_epoch}: validation top-1 {pct(report.best_val_top1)}")
    if report.test is not None:
        t = report.test
        print(f"  test top-1 {pct(t.top1)}  top-5 {pct(t.top5)}  ({t.num_samples} images)")
        for name, acc in sorted(t.heads.items()):
            print(f"    head {name}: {pct(acc)}")
    print(f"  training time {report.train_seconds / 60:.1f} min")
    print(f"  files: {report.run_dir}/checkpoints/best.pt, metrics.csv, test_metrics.json, test_confusion.png, tb/")
    if report.skipped_images:
        print(f"  skipped {len(report.skipped_images)} unreadable image(s):")
        for p in report.skipped_images[:20]:
            print(f"    {p}")


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model from a YAML recipe, then evaluate it on the test split")
    add_config(p, required=True)
    p.add_argument("--name", help="run name (runs/<name>/); default: the recipe's name")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh over an existing run")
    p.add_argument("--init-from", help="VGG: initialise from a trained shallower VGG (configuration A) checkpoint")
    p.add_argument("--pretrained-file", help="local backbone weights (safetensors or state dict)")
    p.add_argument(
        "--check",
        action="store_true",
        help="check the recipe, read the data, build the model and decide start / resume / refuse, then stop "
        "(nothing is written)",
    )
    add_quiet(p)
    p.set_defaults(func=cmd_train)

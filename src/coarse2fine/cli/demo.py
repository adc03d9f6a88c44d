"""``c2f demo`` (what ``make demo`` runs): the building block, then HD-CNN on top of it, on Fashion-MNIST."""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from coarse2fine.cli.common import add_quiet, add_set
from coarse2fine.cli.hdcnn import print_report
from coarse2fine.cli.train import print_run_report
from coarse2fine.config import load_config
from coarse2fine.recipes import train_run
from coarse2fine.recipes.hdcnn import run_pipeline

DEFAULT_RECIPE = "configs/fashion_mnist_vgg.yaml"


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo's runs are ``runs/demo_block`` and ``runs/demo_hdcnn``; a new demo replaces them."""
    shared = list(args.overrides)
    if args.quick:
        shared += ["data.limit_train=3000", "data.limit_test=1000"]
    epochs = 1 if args.quick else args.epochs
    cfg = load_config(args.config, ["name=demo_block", f"train.epochs={epochs}", *shared])
    print(f"demo: training {cfg.model.name} on {cfg.data.name} for {cfg.train.epochs} epoch(s) -> {cfg.run_dir}")
    start = time.perf_counter()
    report = train_run(cfg, resume=False, overwrite=True, progress=not args.quiet)
    print_run_report(report)
    if args.skip_hdcnn:
        return 0
    block = report.run_dir / "checkpoints" / "best.pt"
    hcfg = load_config(
        args.hdcnn_config,
        [
            "name=demo_hdcnn",
            f"hdcnn.block_checkpoint={block}",
            f"hdcnn.fine_epochs={args.hdcnn_epochs}",
            f"hdcnn.finetune_epochs={args.hdcnn_epochs}",
            *shared,
            *args.hdcnn_overrides,
        ],
    )
    shutil.rmtree(hcfg.run_dir, ignore_errors=True)  # stages of an older demo were built on another block
    print(f"\ndemo: HD-CNN on top of that building block -> {hcfg.run_dir}")
    hreport = run_pipeline(hcfg, resume=True, progress=not args.quiet)
    print()
    print_report(hreport)
    print(f"\nfiles: {hcfg.run_dir}/ (hierarchy.json, hierarchy.png, hdcnn_report.json, the beta trade-off plot)")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="the main job: small VGG then HD-CNN on Fashion-MNIST")
    p.add_argument("--config", default=DEFAULT_RECIPE)
    p.add_argument("--hdcnn-config", default="configs/hdcnn_fashion_mnist.yaml")
    add_set(p)
    p.add_argument("--hdcnn-set", dest="hdcnn_overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=3, help="building-block epochs (default 3)")
    p.add_argument("--hdcnn-epochs", type=int, default=1, help="epochs of each HD-CNN training stage (default 1)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run on a subset")
    p.add_argument("--skip-hdcnn", action="store_true")
    add_quiet(p)
    p.set_defaults(func=cmd_demo)

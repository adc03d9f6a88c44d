"""Small VGG trained on the real Fashion-MNIST: accuracy curve, time, and final test accuracy.

    .venv/bin/python benchmarks/fashion_mnist.py [--epochs 12] [--set key=value ...]

Trains ``configs/fashion_mnist_vgg.yaml`` (``best`` chosen on the 10% held-out split, test split used
once at the end) and prints a markdown table: per epoch the cumulative training minutes, train and
validation accuracy; then the test accuracy of the best checkpoint, one view and with the VGG paper's
test-time flip (METHODS.md §1: the image and its horizontal flip, softmax averaged). Goal (issue 2): >= 94.5%
test accuracy within 20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from coarse2fine.config import load_config
from coarse2fine.recipes import build_datasets, evaluate_protocol_on, load_trained, train_run


def machine() -> str:
    dev = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, {dev}, torch {torch.__version__}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fashion_mnist_vgg.yaml")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--name", default="bench_fmnist")
    args = p.parse_args()
    overrides = [f"name={args.name}", *args.overrides]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = load_config(args.config, overrides)
    start = time.perf_counter()
    report = train_run(cfg, overwrite=True, progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {machine()}")
    print(f"recipe: {args.config} model={cfg.model.name} epochs={cfg.train.epochs} batch={cfg.data.batch_size}\n")
    print("| epoch | minutes (cumulative) | train top-1 | val top-1 |")
    print("|---|---|---|---|")
    total = 0.0
    for row in report.history:
        total += float(row.get("seconds", 0.0))
        train, val = 100 * float(row["train_top1"]), 100 * float(row["val_top1"])
        print(f"| {row['epoch']} | {total / 60:.1f} | {train:.2f} | {val:.2f} |")
    assert report.test is not None
    print(
        f"\nbest epoch {report.best_epoch} (validation), test top-1 {100 * report.test.top1:.2f}%, "
        f"top-5 {100 * report.test.top5:.2f}%; training {report.train_seconds / 60:.1f} min, wall {wall / 60:.1f} min"
    )
    start = time.perf_counter()
    trained = load_trained(report.run_dir / "checkpoints" / "best.pt")
    bundle = build_datasets(trained.cfg)
    flip, views = evaluate_protocol_on(
        trained.model, trained.cfg, bundle.test, "center", trained.facts.data_stats, len(trained.classes)
    )
    print(
        f"test with flip ({views} views, center protocol): top-1 {100 * flip.top1:.2f}%, top-5 {100 * flip.top5:.2f}% "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

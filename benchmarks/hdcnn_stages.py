"""Shared by the benchmarks that re-use the cached stages of a benchmarks/hdcnn.py run (not a benchmark)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from coarse2fine.config import RunConfig, load_config
from coarse2fine.recipes import build_datasets, build_loaders
from coarse2fine.recipes.hdcnn import Pretrained, StagePaths, pretrain_stages


def stages_parser(doc: str | None) -> argparse.ArgumentParser:
    """--config, --out, --name, --set (the overrides of the run that made the stages), --threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/hdcnn_fashion_mnist.yaml")
    ap.add_argument("--out", default="runs/bench_hdcnn_full")
    ap.add_argument("--name", default="full")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def load_stages(args: argparse.Namespace) -> tuple[RunConfig, Any, Any, Pretrained]:
    """(config, data bundle, loaders, block + hierarchy + pre-trained fine components) from ``<out>/<name>/``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.overrides, f"out_dir={args.out}", f"name={args.name}"])
    bundle = build_datasets(cfg)
    loaders = build_loaders(cfg, bundle)
    pre = pretrain_stages(cfg, bundle, loaders, StagePaths(cfg.run_dir), resume=True, progress=False)
    return cfg, bundle, loaders, pre

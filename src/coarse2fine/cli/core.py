"""Core commands: ``train``, ``eval``, ``predict``, ``models``, ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coarse2fine.config import RunConfig, apply_overrides, config_from_dict, load_config, to_dict
from coarse2fine.errors import ConfigError, DataError

DEFAULT_RECIPE = Path("configs/fashion_mnist_vgg.yaml")


def add_config_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML recipe (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.epochs=5 (repeatable)",
    )


def resolve_config(args: argparse.Namespace, extra: list[str] | None = None) -> RunConfig:
    return load_config(args.config, list(args.overrides) + list(extra or []))


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


# ---- train -------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from coarse2fine.engine import distributed as du
    from coarse2fine.workflow import train_run

    extra = []
    if args.name:
        extra.append(f"name={args.name}")
    if args.init_from:
        extra.append(f"model.init_from={args.init_from}")
    if args.pretrained_file:
        extra.append(f"model.pretrained_file={args.pretrained_file}")
    cfg = resolve_config(args, extra)
    launcher = ["c2f"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: resume the same way
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}", "-m", "coarse2fine"]
    hint = " ".join([*launcher, "train", *sys.argv[2:]] + ([] if args.resume else ["--resume"]))
    report = train_run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, resume_hint=hint)
    if du.is_main_process():
        print_run_report(report)
    return 0


def print_run_report(report: Any) -> None:
    print(f"\nrun: {report.run_dir}")
    print(f"  best epoch {report.best_epoch}: validation top-1 {_fmt_pct(report.best_val_top1)}")
    if report.test is not None:
        t = report.test
        print(f"  test top-1 {_fmt_pct(t.top1)}  top-5 {_fmt_pct(t.top5)}  ({t.num_samples} images)")
        for name, acc in sorted(t.heads.items()):
            print(f"    head {name}: {_fmt_pct(acc)}")
    print(f"  training time {report.train_seconds / 60:.1f} min")
    print(f"  files: {report.run_dir}/checkpoints/best.pt, metrics.csv, test_metrics.json, test_confusion.png, tb/")
    if report.skipped_images:
        print(f"  skipped {len(report.skipped_images)} unreadable image(s):")
        for p in report.skipped_images[:20]:
            print(f"    {p}")


# ---- eval --------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from coarse2fine.build import build_datasets, eval_loader, evaluate_protocol_on, load_trained
    from coarse2fine.engine import evaluate, save_eval_artifacts

    trained = [load_trained(p) for p in args.checkpoint]
    first = trained[0]
    for t in trained[1:]:
        if t.classes != first.classes:
            raise ConfigError(
                f"fusion: {t.path} has classes {t.classes[:5]}... but {first.path} has {first.classes[:5]}...; "
                "fused models must share the class list"
            )
    cfg = first.cfg
    if args.overrides:
        cfg = config_from_dict(apply_overrides(to_dict(cfg), args.overrides))
    bundle = build_datasets(cfg)
    if bundle.classes != first.classes:
        raise ConfigError(f"checkpoint {first.path} was trained on other classes than dataset {cfg.data.name!r}")
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
            first.metadata["data_stats"],
            len(first.classes),
            scales=args.scales or cfg.eval.scales,
            flip=not args.no_flip,
        )
    seconds = time.perf_counter() - start
    paths = save_eval_artifacts(result, out, first.classes, prefix=f"{args.split}_{protocol.replace('+', '_')}")
    print(f"{args.split} ({result.num_samples} images), protocol {protocol}, {len(trained)} model(s), {views} view(s)")
    print(f"  top-1 {_fmt_pct(result.top1)}  top-5 {_fmt_pct(result.top5)}  error {100 * (1 - result.top1):.2f}%")
    print(f"  {1000 * seconds / max(1, result.num_samples):.2f} ms per image")
    print(f"  wrote {paths['metrics']} and {paths['confusion_png']}")
    return 0


# ---- predict -----------------------------------------------------------------------------------------


def read_image_tensor(path: str, channels: int) -> torch.Tensor:
    """An image file as a uint8 (C, H, W) tensor in the model's colour mode."""
    from coarse2fine.data import load_image

    if not Path(path).is_file():
        raise DataError(f"image {path!r} does not exist")
    img = load_image(path, mode="L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


@torch.inference_mode()
def predict_images(trained: Any, paths: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    from coarse2fine.engine.objective import logits_of

    md = trained.metadata
    transform = trained.eval_transform()
    out = []
    for p in paths:
        img = read_image_tensor(p, md.get("in_chans", 3))
        # in-memory datasets use a batched transform (uint8 batch in), file datasets a per-image one
        x = transform(img[None]) if md.get("in_memory") else transform(img)[None]
        probs = torch.softmax(logits_of(trained.model(x)).float(), dim=1)[0]
        k = min(topk, probs.numel())
        vals, idx = probs.topk(k)
        out.append([(trained.classes[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())])
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from coarse2fine.build import load_trained

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


# ---- models ------------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from coarse2fine.models import list_models, model_summary

    names = [n for n in list_models() if not args.filter or args.filter in n]
    if args.timm:
        names += [f"timm/{n}" for n in args.timm]
    print(f"{'model':<24} {'params':>14} {'GFLOPs':>10}  input (C,H,W)")
    for name in names:
        s = model_summary(name, num_classes=args.num_classes)
        print(f"{name:<24} {s['params']:>14,} {s['flops'] / 1e9:>10.3f}  {tuple(s['input_size'])}")
    return 0


# ---- demo --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the building block, then the HD-CNN pipeline on top of it, on Fashion-MNIST.

    The demo's runs are ``runs/demo_block`` and ``runs/demo_hdcnn``; a new demo replaces them.
    """
    import shutil

    from coarse2fine.cli.hdcnn import print_report
    from coarse2fine.hdcnn import run_pipeline
    from coarse2fine.workflow import train_run

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


# ---- registration ------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML recipe, then evaluate it on the test split")
    add_config_args(p, required=True)
    p.add_argument("--name", help="run name (runs/<name>/); default: the recipe's name")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh over an existing run")
    p.add_argument("--init-from", help="VGG: initialise from a trained shallower VGG (configuration A) checkpoint")
    p.add_argument("--pretrained-file", help="local backbone weights (safetensors or state dict)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate checkpoint(s) with a VGG test protocol; several = fusion")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint (repeat to fuse models)")
    p.add_argument(
        "--protocol", choices=["center", "dense", "multicrop", "multiscale", "dense+multicrop"], default=None
    )
    p.add_argument("--scales", type=int, nargs="+", help="test scales Q (shortest side)")
    p.add_argument("--no-flip", action="store_true", help="do not average with horizontally flipped images")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-5 classes with probabilities for image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list models with parameter count and FLOPs at the default input size")
    p.add_argument("--filter", help="only names containing this text")
    p.add_argument("--timm", nargs="*", default=[], help="also show these timm models")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="the main job: small VGG then HD-CNN on Fashion-MNIST")
    p.add_argument("--config", default=str(DEFAULT_RECIPE))
    p.add_argument("--hdcnn-config", default="configs/hdcnn_fashion_mnist.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--hdcnn-set", dest="hdcnn_overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=3, help="building-block epochs (default 3)")
    p.add_argument("--hdcnn-epochs", type=int, default=1, help="epochs of each HD-CNN training stage (default 1)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run on a subset")
    p.add_argument("--skip-hdcnn", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_demo)

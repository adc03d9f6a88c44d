"""Batch prediction speed: ``c2f predict``'s recipe against the eval path on the same images and model.

Writes N small images (PNG and JPEG, several sizes) into a temporary class-per-folder tree, saves a freshly
built (untrained) small VGG in the normal checkpoint format, and times, in one process and alternating:

- eval: ``ImageFolderDataset`` over the tree + ``recipes.eval_loader`` + ``engine.evaluate`` (what
  ``c2f eval`` runs for a folder dataset, centre protocol);
- predict: ``recipes.predict.predict`` on the tree's folder (finding the files, the same loader settings and
  transform, top-5 rows sorted by path).

Both use the model loaded once by ``load_trained``, the same batch size, workers and threads. Prints a
table of images/s (best of ``--repeats``) and the ratio predict / eval (docs/BENCHMARKS.md).

    .venv/bin/python benchmarks/predict_speed.py                 # N = 10000
    .venv/bin/python benchmarks/predict_speed.py --n 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from coarse2fine.config import load_config, to_dict
from coarse2fine.data import ImageFolderDataset
from coarse2fine.engine import evaluate, save_checkpoint
from coarse2fine.facts import RunFacts
from coarse2fine.recipes import build_model_and_objective, eval_loader, load_trained
from coarse2fine.recipes.predict import PredictRequest, predict

CLASSES = [f"class_{i}" for i in range(10)]


def write_images(root: Path, n: int, seed: int = 0) -> None:
    """``root/train/<class>/<i>.png|jpg``: random images of 28-48 px a side, a third JPEG."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(28, 49, size=2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ext = "jpg" if i % 3 == 0 else "png"
        img.save(root / "train" / CLASSES[i % len(CLASSES)] / f"{i:06d}.{ext}")


def write_checkpoint(root: Path, args: argparse.Namespace) -> Path:
    cfg = load_config(
        None,
        [
            "data.name=folder",
            f"data.root={root}",
            f"data.image_size={args.size}",
            f"data.workers={args.workers}",
            f"data.eval_batch_size={args.batch}",
            "train.device=cpu",
            f"model.name={args.model}",
            f"model.kwargs={{width_mult: {args.width_mult}, hidden: [{args.hidden}]}}",
        ],
    )
    facts = RunFacts(3, args.size, {"mean": [0.5] * 3, "std": [0.25] * 3}, False, list(CLASSES))
    model, _ = build_model_and_objective(cfg, facts, load_files=False)
    ckpt = {"model": model.state_dict(), "config": to_dict(cfg), "classes": CLASSES, "metadata": facts.to_dict()}
    return save_checkpoint(ckpt, root / "model.pt")


def time_eval(trained: object, root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    dataset = ImageFolderDataset(root, "train")
    loader = eval_loader(trained.cfg, dataset, trained.eval_transform())  # type: ignore[attr-defined]
    result = evaluate(trained.model, loader, num_classes=len(CLASSES), device="cpu", progress=False)  # type: ignore[attr-defined]
    return time.perf_counter() - start, result.num_samples


def time_predict(trained: object, root: Path, ckpt: Path) -> tuple[float, int]:
    start = time.perf_counter()
    req = PredictRequest([str(root / "train")], str(ckpt), topk=5, device="cpu", progress=False)
    result = predict(req, trained)  # type: ignore[arg-type]
    return time.perf_counter() - start, len(result.rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="images")
    p.add_argument("--size", type=int, default=32, help="the model's input (centre crop)")
    p.add_argument("--model", default="vgg_small_bn")
    p.add_argument("--width-mult", type=float, default=0.5)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2, help="alternating eval / predict passes; best of each")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="c2f_predict_speed_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_images(root, args.n)
        print(f"wrote {args.n} images in {time.perf_counter() - start:.1f} s")
        ckpt = write_checkpoint(root, args)
        trained = load_trained(ckpt)
        times: dict[str, list[float]] = {"eval": [], "predict": []}
        for _ in range(args.repeats):
            seconds, n = time_eval(trained, root)
            assert n == args.n, n
            times["eval"].append(seconds)
            seconds, n = time_predict(trained, root, ckpt)
            assert n == args.n, n
            times["predict"].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    ips = {k: args.n / v for k, v in best.items()}
    print(
        f"\ntorch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPU(s), {args.threads} thread(s), "
        f"{args.workers} worker(s), batch {args.batch}; {args.model} width_mult {args.width_mult} at "
        f"{args.size}px; {args.n} images (28-48 px, 1/3 JPEG); best of {args.repeats}\n"
    )
    print("| path | seconds (each pass) | images/s | ratio to eval |")
    print("|---|---|---:|---:|")
    for k in ("eval", "predict"):
        each = ", ".join(f"{s:.1f}" for s in times[k])
        print(f"| {k} | {each} | {ips[k]:.0f} | {ips[k] / ips['eval']:.2f}x |")


if __name__ == "__main__":
    main()

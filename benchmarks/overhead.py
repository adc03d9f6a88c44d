"""Engine overhead: ``engine.fit`` against a bare PyTorch loop, same model, data, batch and loader.

    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py [--limit-train 6400] [--epochs 2] [--repeats 3]
    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py --data folder     # a generated JPEG tree
    PYTHONPATH=src .venv/bin/python benchmarks/overhead.py --profile         # cProfile of one arm of each

Clocks: on this shared 2-core machine the wall clock swings with other jobs (a ratio of 0.5x or
2x between neighbouring arms), so the per-epoch time is also taken in this process's CPU time
(``time.process_time``) and in its user CPU time alone. The kernel's share (system time) is mostly
page faults, which vary up to 10x between arms with the allocator's history (glibc giving freed
activation memory back to the kernel; ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` stop it,
docs/BENCHMARKS.md), so the user clock is the steadiest measure of the work each loop does.
``--limit-train 0`` trains on the whole training split.

The engine arm is ``fit`` as a recipe runs it: checkpoints every epoch (and one before the first),
metrics.csv and TensorBoard (``default_callbacks``), a progress bar, validation after every epoch.
The bare arm is the loop written below: forward, loss, backward, SGD step (same optimizer settings,
torch's OneCycleLR), then a plain validation pass over the same validation loader (the engine
validates every epoch too; without it the comparison would charge the engine for work the recipe
asks for). Both arms use the same loader objects, a fresh model with the same initial weights, the
recipe's channels_last and autocast setting, and the arms take turns (engine, bare, bare, engine, ...),
so a ratio is measured under the same machine load.

Reported per arm (median over the repeats): training images/s of the training phase alone (the
engine's ``train_seconds``: its step loop with meters, progress bar and non-finite check), per epoch
(training + validation + the engine's checkpoint and log writes), and the fixed cost of one ``fit``
before its first epoch (opening the run folder, the untrained checkpoint, TensorBoard's writer).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.optim.lr_scheduler import OneCycleLR

from coarse2fine.config import RunConfig, load_config
from coarse2fine.engine import Callback, FitSetup, RunFolder, default_callbacks, fit
from coarse2fine.engine.allocator import tune_malloc
from coarse2fine.engine.evaluate import autocast, autocast_dtype, resolve_device
from coarse2fine.recipes import build_datasets
from coarse2fine.recipes.data import build_loaders
from coarse2fine.recipes.models import build_model_and_objective


class _Clock(Callback):
    """Timestamps of the engine's hooks (appended after the default loggers, so it runs last)."""

    def __init__(self) -> None:
        self.start = self.cpu_start = self.user_start = 0.0
        self.ends: list[float] = []
        self.cpu_end = self.user_end = 0.0
        self.records: list[Mapping[str, Any]] = []

    def on_fit_start(self, state: Any) -> None:
        self.start, self.cpu_start, self.user_start = time.perf_counter(), time.process_time(), _user()

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_end, self.user_end = time.process_time(), _user()
        self.records.append(dict(record))


def engine_arm(cfg: RunConfig, bundle: Any, loaders: Any, workdir: Path, progress: bool) -> dict[str, float]:
    model, objective = build_model_and_objective(cfg, bundle.facts())
    run = RunFolder(workdir, overwrite=True)
    clock = _Clock()
    setup = FitSetup.from_run_config(cfg, bundle.classes, bundle.facts().to_dict(), progress=progress)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    fit(model, objective, loaders.train, loaders.val, setup, run, [*default_callbacks(run), clock])
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    epochs = np.diff([clock.start, *clock.ends])
    return {
        "train_s": sum(float(r["train_seconds"]) for r in clock.records),
        "epoch_s": float(epochs.sum()),
        "epoch_cpu_s": clock.cpu_end - clock.cpu_start,
        "epoch_user_s": clock.user_end - clock.user_start,
        "setup_s": clock.start - t0,
        "total_s": t1 - t0,
        **_usage(r0, r1),
    }


def bare_arm(cfg: RunConfig, bundle: Any, loaders: Any, workdir: Path, progress: bool) -> dict[str, float]:
    """The plain loop: what a user writes without the engine (timm / torchvision reference style)."""
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.amp, device)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model, _ = build_model_and_objective(cfg, bundle.facts())
    model = model.to(device, memory_format=fmt)
    o = cfg.optim
    opt = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )
    sched = OneCycleLR(opt, max_lr=o.lr, total_steps=cfg.train.epochs * len(loaders.train))
    smoothing = cfg.train.label_smoothing
    train_s = 0.0
    start, cpu_start, user_start = time.perf_counter(), time.process_time(), _user()
    for epoch in range(cfg.train.epochs):
        loaders.train.set_epoch(epoch)
        model.train()
        e0 = time.perf_counter()
        for x, y in loaders.train:
            x, y = x.to(device, memory_format=fmt), y.to(device)
            with autocast(device, dtype):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        train_s += time.perf_counter() - e0
        model.eval()
        correct = 0
        with torch.inference_mode(), autocast(device, dtype):
            for x, y in loaders.val:
                correct += int((model(x.to(device, memory_format=fmt)).argmax(1) == y.to(device)).sum())
    end, cpu_end, user_end = time.perf_counter(), time.process_time(), _user()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "train_s": train_s,
        "epoch_s": end - start,
        "epoch_cpu_s": cpu_end - cpu_start,
        "epoch_user_s": user_end - user_start,
        "setup_s": start - t0,
        "total_s": end - t0,
        **_usage(r0, r1),
    }


def _user() -> float:
    """This process's user CPU seconds: compute without the kernel's share (page faults, file writes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _usage(r0: Any, r1: Any) -> dict[str, float]:
    """User and system CPU seconds and minor page faults of the whole arm (setup included)."""
    return {"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
            "minor_faults": float(r1.ru_minflt - r0.ru_minflt)}


ARMS: dict[str, Callable[..., dict[str, float]]] = {"engine": engine_arm, "bare": bare_arm}


def make_jpeg_tree(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/<i>.jpg``: smooth random colour fields (JPEG-friendly), quality 90."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", max(2, per_class // 5))):
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
                img.save(folder / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text("ok")
    return root


def load_machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/fashion_mnist_vgg.yaml")
    p.add_argument("--data", choices=["recipe", "folder"], default="recipe",
                   help="folder: a generated JPEG tree (data.name=folder) instead of the recipe's data")
    p.add_argument("--malloc", choices=["cli", "default"], default="cli",
                   help="cli: malloc thresholds fixed as `c2f` does (engine/allocator.py); default: glibc's")
    p.add_argument("--folder-root", default=os.path.join(tempfile.gettempdir(), "c2f_overhead_jpeg"))
    p.add_argument("--folder-images", type=int, default=200, help="training images per class (10 classes)")
    p.add_argument("--limit-train", type=int, default=6400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine's progress bars (on by default, as in a recipe run)")
    p.add_argument("--profile", action="store_true", help="cProfile one arm of each and print their top functions")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    overrides = [f"train.epochs={args.epochs}", "data.limit_test=100"]
    if args.limit_train:
        overrides.append(f"data.limit_train={args.limit_train}")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if args.data == "folder":
        root = make_jpeg_tree(Path(args.folder_root), 10, args.folder_images, 96)
        overrides += [
            "data.name=folder", f"data.root={root}", "data.image_size=64", "data.train_scale=[72]",
            "data.workers=1", "data.batch_size=32",
        ]
    return load_config(args.config, overrides + args.overrides)


def profile_arms(cfg: RunConfig, bundle: Any, loaders: Any, workdir: Path, progress: bool) -> None:
    """cProfile of each arm (the same run, one after the other): the functions with the most own time."""
    for arm, fn in ARMS.items():
        prof = cProfile.Profile()
        prof.enable()
        fn(cfg, bundle, loaders, workdir / arm, progress)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        print(f"## {arm}\n{out.getvalue()}")


def summarise(results: dict[str, list[dict[str, float]]], images: int, epochs: int) -> None:
    print("| arm | train phase img/s | per epoch img/s (train + val + writes) | per epoch img/s, CPU clock "
          "| per epoch img/s, user CPU clock | fit setup s | whole run img/s |")
    print("|---|---|---|---|---|---|---|")
    med = {arm: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for arm, rs in results.items()}
    for arm, m in med.items():
        print(f"| {arm} | {images * epochs / m['train_s']:.0f} | {images * epochs / m['epoch_s']:.0f} | "
              f"{images * epochs / m['epoch_cpu_s']:.0f} | {images * epochs / m['epoch_user_s']:.0f} | "
              f"{m['setup_s']:.2f} | {images * epochs / m['total_s']:.0f} |")
    pairs = list(zip(results["engine"], results["bare"]))
    for key, what in (
        ("train_s", "train phase"),
        ("epoch_s", "per epoch"),
        ("epoch_cpu_s", "per epoch, CPU clock"),
        ("epoch_user_s", "per epoch, user CPU clock"),
        ("total_s", "whole run"),
    ):
        ratios = [b[key] / e[key] for e, b in pairs]
        print(f"\nengine / bare, {what}: median {statistics.median(ratios):.3f}x "
              f"(each repeat: {', '.join(f'{r:.3f}' for r in ratios)})", end="")
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tuned = tune_malloc() if args.malloc == "cli" else False
    cfg = build_config(args)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bundle = build_datasets(cfg)
    loaders = build_loaders(cfg, bundle)
    images = len(loaders.train) * cfg.data.batch_size
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {load_machine()} (at the start); malloc thresholds fixed as c2f does: {tuned}")
    print(f"recipe: {args.config} data={cfg.data.name} model={cfg.model.name} batch={cfg.data.batch_size} "
          f"train images/epoch={images} val images={len(bundle.val)} epochs={cfg.train.epochs} "
          f"amp={cfg.train.amp} channels_last={cfg.train.channels_last}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            profile_arms(cfg, bundle, loaders, Path(tmp), args.progress)
            return 0
        results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
        for r in range(args.repeats):
            order = ["engine", "bare"] if r % 2 == 0 else ["bare", "engine"]
            for arm in order:
                stderr = contextlib.nullcontext() if args.progress else contextlib.redirect_stderr(io.StringIO())
                with stderr:
                    results[arm].append(ARMS[arm](cfg, bundle, loaders, Path(tmp) / f"{arm}_{r}", args.progress))
                res = results[arm][-1]
                print(f"repeat {r + 1} {arm}: train {res['train_s']:.1f} s, epochs {res['epoch_s']:.1f} s "
                      f"(CPU {res['epoch_cpu_s']:.1f} s, user {res['epoch_user_s']:.1f} s; whole arm: "
                      f"sys {res['sys_s']:.1f} s, {res['minor_faults']:.0f} minor page faults), "
                      f"setup {res['setup_s']:.2f} s, total {res['total_s']:.1f} s", flush=True)
    print(f"\nmachine: {load_machine()} (at the end)\n")
    summarise(results, images, cfg.train.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput of a small-image folder tree with and without the image cache (docs/BENCHMARKS.md).

One run, four arms, interleaved round by round (the same images, model and augmentation in each):

- ``files``: no cache; every image decoded and augmented one at a time through the file loader
  (``data.workers`` processes, BatchAugment per image);
- ``build``: the first epoch with a cache: decoding every image into a fresh cache, then the epoch;
- ``cached``: an epoch on the cache read back (the in-memory loader, BatchAugment per batch);
- ``memory``: the same images preloaded as an InMemoryDataset without the cache.

The loader of each arm is also timed alone (no model, best of three passes): the data path's own cost.

Each epoch trains ``vgg_small_bn`` (batch 128, SGD nesterov, label smoothing 0.1, channels_last) with the
folder recipe's augmentation (zero padding 4, random 32 crop, flip). Images per second are the images
of the epoch over its wall time, data loading included.

    .venv/bin/python benchmarks/folder_cache.py --root ~/data/cifar10-jpeg/train --limit 10000
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from coarse2fine import data as D
from coarse2fine.models import create_model

LOADERS = ("files", "cached", "memory")


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children: the loader's workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def epoch(dataset, transform, args: argparse.Namespace, state: dict, seed: int, train: bool = True):
    """(images per wall second, images per CPU second) of one training epoch, loading included, from the
    same initial weights (``train=False``: the loader alone). CPU seconds count every process (workers
    too): the figure a busy machine disturbs least."""
    model = create_model("vgg_small_bn", num_classes=len(dataset.classes)).to(memory_format=torch.channels_last)
    if train:
        model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    loader = D.build_loader(dataset, transform, batch_size=args.batch, seed=seed, workers=args.workers)
    loader.set_epoch(seed)
    start, cpu, seen = time.perf_counter(), cpu_seconds(), 0
    for x, y in loader:
        seen += len(y)
        if not train:
            continue
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
        opt.step()
    wall = time.perf_counter() - start
    workers = getattr(getattr(loader, "_loader", None), "_iterator", None)
    if workers is not None:  # join the persistent workers now, so that their CPU time is counted
        workers._shutdown_workers()
    del loader
    gc.collect()
    return seen / wall, seen / (cpu_seconds() - cpu)


def loader_alone(dataset, transform, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    """The loader without a model, best of three passes: small batched ops on two busy cores are at the
    mercy of the thread pool's scheduling (one pass can be ten times slower than the next)."""
    passes = [epoch(dataset, transform, args, {}, seed, train=False) for _ in range(3)]
    return max(w for w, _ in passes), max(c for _, c in passes)


def preload(files: D.ImageFileDataset) -> D.InMemoryDataset:
    """The images decoded straight into an InMemoryDataset (no cache)."""
    arr = np.stack([np.asarray(D.load_image(p)).transpose(2, 0, 1) for p in files.paths])
    return D.InMemoryDataset(torch.from_numpy(arr), files.targets, files.classes, source="preloaded")


def cache_arms(files, tf, args, state, r: int, results: dict) -> None:
    """``build`` (decode into a fresh cache, then an epoch) and ``cached`` (read it back, an epoch)."""
    cache_dir = Path(tempfile.mkdtemp(prefix="c2f-bench-cache-"))
    try:
        start, cpu = time.perf_counter(), cpu_seconds()
        built = D.cached_images(files, (32, 32), cache_dir=cache_dir, workers=args.workers, progress=False)
        gc.collect()
        build_s, build_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        first = epoch(built, tf, args, state, r)
        n = len(files)
        results["build"].append((n / (build_s + n / first[0]), n / (build_cpu + n / first[1])))
        results["build_s"].append((build_s, build_cpu))
        start = time.perf_counter()
        cached = D.cached_images(files, (32, 32), cache_dir=cache_dir, workers=args.workers)
        results["load_s"].append((time.perf_counter() - start, 0.0))
        results["cached"].append(epoch(cached, tf, args, state, r))
        results["cached_loader"].append(loader_alone(cached, tf, args, r))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def run_round(files, memory, tf, args, state, r: int, results: dict) -> None:
    """The arms in turn; odd rounds in the reverse order, so a drifting machine load spreads over all."""
    arms = [
        lambda: results["files"].append(epoch(files, tf, args, state, r)),
        lambda: results["files_loader"].append(loader_alone(files, tf, args, r)),
        lambda: cache_arms(files, tf, args, state, r, results),
        lambda: results["memory"].append(epoch(memory, tf, args, state, r)),
        lambda: results["memory_loader"].append(loader_alone(memory, tf, args, r)),
    ]
    for arm in arms[:: -1 if r % 2 else 1]:
        arm()
    last = {k: v[-1] for k, v in results.items()}
    print(
        f"round {r}: files {last['files'][0]:.0f} img/s ({last['files'][1]:.0f} per CPU-s), build "
        f"{last['build_s'][0]:.1f} s + epoch = {last['build'][0]:.0f} ({last['build'][1]:.0f}), cached "
        f"{last['cached'][0]:.0f} ({last['cached'][1]:.0f}), memory {last['memory'][0]:.0f} ({last['memory'][1]:.0f}) "
        f"(load {load_average()})",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a class-per-folder tree of 32x32 images")
    p.add_argument("--limit", type=int, default=10000, help="images used (class-balanced)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="decode processes (files arm and the cache build)")
    args = p.parse_args()
    torch.manual_seed(0)
    tree = D.ImageFolderDataset(args.root)
    view = D.limit(tree, args.limit, seed=0)
    idx = view.indices if isinstance(view, D.DatasetView) else np.arange(len(tree))
    files = D.ImageFileDataset([tree.paths[int(i)] for i in idx], tree.targets[idx], tree.classes, source=args.root)
    memory = preload(files)
    stats = D.compute_mean_std(memory)
    tf = D.BatchAugment(stats["mean"], stats["std"], size=32, train=True, pad=4, flip=True)
    state = create_model("vgg_small_bn", num_classes=len(tree.classes)).state_dict()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"{len(files)} images of {args.root}; {machine}, {torch.get_num_threads()} threads; load {load_average()}")
    results: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("files", "build", "build_s", "load_s", "cached", "memory", *(f"{a}_loader" for a in LOADERS))
    }
    epoch(D.limit(memory, 4 * args.batch), tf, args, state, 0)  # warm-up: kernels, allocator
    for r in range(args.rounds):
        run_round(files, memory, tf, args, state, r, results)
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in results.items()}
    print(
        "\n| arm | images/s | vs in memory | images per CPU-second | vs in memory | loader alone, images/s |"
        "\n|---|---|---|---|---|---|"
    )
    for arm, what in (
        ("files", "folder, no cache (decoded per image by the loader)"),
        ("build", f"folder, first epoch with cache build ({med['build_s'][0]:.1f} s decoding)"),
        ("cached", f"folder, cached epochs (cache read in {med['load_s'][0]:.2f} s)"),
        ("memory", "preloaded InMemoryDataset"),
    ):
        (w, c), (mw, mc) = med[arm], med["memory"]
        alone = f"{med[arm + '_loader'][0]:.0f}" if arm + "_loader" in med else "-"
        print(f"| {what} | {w:.0f} | {w / mw:.2f}x | {c:.0f} | {c / mc:.2f}x | {alone} |")
    print(f"\nmedians of {args.rounds} rounds; per round (wall, CPU):")
    for k, vals in results.items():
        print(f"  {k}: {', '.join(f'({a:.1f}, {b:.1f})' for a, b in vals)}")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()

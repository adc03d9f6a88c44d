"""Peak memory of streaming evaluation over a large image folder: it must not grow with the image count.

For each N a class-per-folder tree of N small PNGs is generated (once, cached under ``--dir``), then a
fresh process lists it (``ImageFolderDataset``), streams it through ``build_loader`` (workers, eval
transform) and a tiny CNN under ``torch.inference_mode()``, keeping only a confusion matrix, and reports
its peak RSS and that of its loader workers (``getrusage``), and the workers' private memory (pages not
shared with the parent after fork, sampled from ``/proc/<pid>/smaps_rollup``).

    .venv/bin/python benchmarks/load_memory.py                      # N = 5k, 20k, 50k
    .venv/bin/python benchmarks/load_memory.py --ns 1000,4000 --workers 1
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 10


def generate(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``folder/class_k/img_i.png`` for i < n (skipped when already complete)."""
    from PIL import Image

    marker = folder / ".complete"
    if marker.exists():
        return
    rng = np.random.default_rng(seed)
    for k in range(CLASSES):
        (folder / f"class_{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"class_{i % CLASSES}" / f"img_{i:06d}.png", compress_level=1)
    marker.write_text(str(n))


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _private_mib(pid: int) -> float:
    """Memory only this process holds (private clean + dirty pages; pages shared with the parent after
    fork are left out), from /proc/<pid>/smaps_rollup; 0 when unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    kib = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty")))
    return kib / 1024


def measure(folder: Path, batch_size: int, workers: int, size: int) -> dict:
    """Run in a fresh process: list, stream and classify every image once."""
    import torch
    from torch import nn

    from coarse2fine.data import ImageFolderDataset, build_loader
    from coarse2fine.data.transforms import large_eval_transform

    torch.set_num_threads(1)
    base = _rss_mib(resource.RUSAGE_SELF)
    ds = ImageFolderDataset(folder)
    listed = _rss_mib(resource.RUSAGE_SELF)
    tf = large_eval_transform([0.5] * 3, [0.25] * 3, crop=size, scale=size)
    loader = build_loader(
        ds, tf, batch_size=batch_size, shuffle=False, drop_last=False, pad_shards=False, workers=workers
    )
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES)
    ).eval()
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    seen, private = 0, 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for step, (x, y) in enumerate(loader):
            pred = model(x).argmax(1)
            confusion += torch.bincount(y * CLASSES + pred, minlength=CLASSES * CLASSES).view(CLASSES, CLASSES)
            seen += len(y)
            if step % 5 == 0:  # loader workers are multiprocessing children of this process
                private = max([private, *(_private_mib(p.pid) for p in multiprocessing.active_children())])
    seconds = time.perf_counter() - start
    del loader  # shuts the persistent workers down, so RUSAGE_CHILDREN includes them
    gc.collect()
    return {
        "n": len(ds),
        "seen": seen,
        "seconds": seconds,
        "rss_after_import": base,
        "rss_after_listing": listed,
        "peak_rss_main": _rss_mib(resource.RUSAGE_SELF),
        "peak_rss_worker": _rss_mib(resource.RUSAGE_CHILDREN),
        "peak_private_worker": private,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="largest folder size")
    parser.add_argument("--ns", type=str, default=None, help="comma-separated sizes (default 5000,20000,N)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/c2f_load_memory"))
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.batch_size, args.workers, args.size)))
        return
    ns = [int(v) for v in args.ns.split(",")] if args.ns else sorted({min(5000, args.n), min(20000, args.n), args.n})
    rows = []
    for n in ns:
        folder = args.dir / f"n{n}_s{args.size}"
        t0 = time.perf_counter()
        generate(folder, n, args.size)
        gen = time.perf_counter() - t0
        cmd = [
            sys.executable,
            __file__,
            "--measure",
            str(folder),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--size",
            str(args.size),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        row["generate_s"] = gen
        rows.append(row)
        print(f"N={n}: {row}", file=sys.stderr)
    print(
        f"\n{args.size}x{args.size} PNGs, batch {args.batch_size}, {args.workers} worker(s), tiny CNN, "
        "inference_mode; peak RSS in MiB\n"
    )
    print(
        "| images | seen | images/s | RSS after imports | RSS after listing | peak RSS main | peak RSS worker "
        "| peak private worker |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']} | {r['seen']} | {r['seen'] / r['seconds']:.0f} | {r['rss_after_import']:.0f} | "
            f"{r['rss_after_listing']:.0f} | {r['peak_rss_main']:.0f} | {r['peak_rss_worker']:.0f} | "
            f"{r['peak_private_worker']:.0f} |"
        )


if __name__ == "__main__":
    main()

"""Feeding large JPEGs: Pillow in the loader workers against batched ``decode_jpeg`` on the device.

    PYTHONPATH=src .venv/bin/python benchmarks/decode.py [--images 256] [--size 500x375] [--workers 2]
    PYTHONPATH=src .venv/bin/python benchmarks/decode.py --devices cpu cuda     # on a machine with a GPU

A generated tree of ImageNet-sized JPEGs (quality 90) goes through the VGG training pipeline (shortest
side to S=256, random 224 crop, flip, normalise) and each loader is timed over one epoch, in turns:

- ``pil``: ``build_loader`` with the Pillow transform (``data.decode_device=cpu``, today's path);
- ``device:<d>``: ``DeviceDecodeLoader`` (``data.decode_device=cuda`` on a GPU): workers read the bytes,
  the main process decodes the batch with ``decode_jpeg(list, device=d)`` and transforms it there.

Images/s counts batches ready on the device (a CUDA sync after each batch for ``cuda``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from coarse2fine.data import ImageFolderDataset, build_loader, large_train_transform
from coarse2fine.data.device_decode import DeviceDecodeLoader, DeviceTransform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_tree(root: Path, n: int, width: int, height: int) -> Path:
    """``n`` photo-like JPEGs (smooth colour fields plus grain) in 4 class folders."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text("ok")
    return root


def epoch_rate(loader: object, device: torch.device) -> float:
    loader.set_epoch(0)  # type: ignore[attr-defined]
    seen = 0
    t0 = time.perf_counter()
    for x, _ in loader:  # type: ignore[attr-defined]
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", nargs="+", default=["cpu"], help="decode devices for the device arms")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "c2f_decode_jpeg"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    ds = ImageFolderDataset(make_tree(Path(args.root) / f"{args.images}_{w}x{h}", args.images, w, h))
    common = dict(batch_size=args.batch, shuffle=True, drop_last=True, workers=args.workers)
    arms: dict[str, tuple[Callable[[], object], torch.device]] = {
        "pil": (lambda: build_loader(ds, large_train_transform(MEAN, STD, crop=224, scale=[256]), **common),
                torch.device("cpu")),
    }
    for d in args.devices:
        tf = DeviceTransform(MEAN, STD, crop=224, scale=[256], train=True)
        arms[f"device:{d}"] = (lambda d=d, tf=tf: DeviceDecodeLoader(ds, tf, device=d, **common), torch.device(d))
    loaders = {name: (make(), dev) for name, (make, dev) in arms.items()}
    for loader, dev in loaders.values():
        epoch_rate(loader, dev)  # start the workers, warm the page cache
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(args.repeats):
        for name in loaders if r % 2 == 0 else list(loaders)[::-1]:
            rates[name].append(epoch_rate(*loaders[name]))
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.images} JPEGs {w}x{h}, "
          f"batch {args.batch}, {args.workers} workers; {args.repeats} epochs in turns (median)\n")
    print("| loader | images/s | vs pil | each epoch |")
    print("|---|---|---|---|")
    base = statistics.median(rates["pil"])
    for name, rs in rates.items():
        med = statistics.median(rs)
        print(f"| {name} | {med:.0f} | {med / base:.2f}x | {', '.join(f'{x:.0f}' for x in rs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

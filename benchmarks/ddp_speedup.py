"""Training throughput of 1 process vs N data-parallel gloo processes (CPU), through ``engine.fit``.

Each configuration is launched with ``torchrun --standalone`` (as users launch it, docs/DISTRIBUTED.md)
on synthetic 1x28x28 data (an in-memory dataset read by ``data.loader.build_loader``) with a small
VGG-like net (3x3 convs 16 16 M 32 32 M 64 M, FC-128, FC-10; no BatchNorm). The per-process batch is
fixed (weak scaling: the global batch grows with the processes). images/s is the train phase of the
last epoch (``history[-1]["images_per_s"]``: all ranks' images / wall time), so start-up, validation
and checkpoint writes are excluded.

    .venv/bin/python benchmarks/ddp_speedup.py                       # brief: 1 and 2 processes
    .venv/bin/python benchmarks/ddp_speedup.py --procs 1 2 4 --steps 200 --epochs 3   # longer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def vgg_like(num_classes: int = 10) -> nn.Module:
    def conv(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv(1, 16), *conv(16, 16), nn.MaxPool2d(2),
        *conv(16, 32), *conv(32, 32), nn.MaxPool2d(2),
        *conv(32, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
    )  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    from coarse2fine.config import OptimConfig, ScheduleConfig, TrainConfig
    from coarse2fine.data.base import InMemoryDataset
    from coarse2fine.data.loader import build_loader
    from coarse2fine.engine import CrossEntropyObjective, FitSetup, RunFolder, fit
    from coarse2fine.engine import distributed as du

    info = du.init_distributed(device="cpu")
    torch.set_num_threads(args.threads)
    world = info.world_size
    n_train = args.steps * args.batch * world
    gen = torch.Generator().manual_seed(0)
    classes = [str(i) for i in range(10)]

    def dataset(n: int) -> InMemoryDataset:
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
        return InMemoryDataset(images, torch.randint(0, 10, (n,), generator=gen).numpy(), classes, source="synthetic")

    train = build_loader(dataset(n_train), None, batch_size=args.batch, rank=info.rank, world_size=world)
    val = build_loader(
        dataset(256),
        None,
        batch_size=256,
        shuffle=False,
        drop_last=False,
        rank=info.rank,
        world_size=world,
        pad_shards=False,
    )
    torch.manual_seed(0)
    model = vgg_like()
    train_cfg = TrainConfig(epochs=args.epochs, device="cpu", amp="off", threads=args.threads, keep_checkpoints=0)
    setup = FitSetup(train_cfg, OptimConfig(lr=0.01), ScheduleConfig(name="constant"), classes, progress=False)
    result = fit(model, CrossEntropyObjective(), train, val, setup, RunFolder(Path(args.run_dir)))
    if du.is_main_process():
        last = result.history[-1]
        Path(args.result).write_text(json.dumps({"images_per_s": last["images_per_s"], "world": world}))
    du.cleanup()


def launch(procs: int, threads: int, args: argparse.Namespace, tmp: Path) -> float:
    out = tmp / f"result_{procs}x{threads}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
        __file__, "--worker", "--threads", str(threads), "--steps", str(args.steps), "--batch", str(args.batch),
        "--epochs", str(args.epochs), "--run-dir", str(tmp / f"run_{procs}x{threads}"), "--result", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{procs} x {threads} failed:\n{proc.stderr[-4000:]}")
    return float(json.loads(out.read_text())["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (1 thread each)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    ap.add_argument("--batch", type=int, default=64, help="per-process batch")
    ap.add_argument("--epochs", type=int, default=2, help="the last one is timed")
    ap.add_argument(
        "--reference-threads",
        type=int,
        default=None,
        help="also time 1 process with this many threads (default: max --procs)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    ref_threads = args.reference_threads or max(args.procs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for p in args.procs:
            ips = launch(p, args.threads, args, Path(tmp))
            base = ips if base is None else base
            rows.append((p, args.threads, args.batch * p, ips, ips / base, ips / base / p))
        if ref_threads > 1:
            ips = launch(1, ref_threads, args, Path(tmp))
            rows.append((1, ref_threads, args.batch, ips, ips / base, ips / base / ref_threads))
    print(
        f"steps/epoch={args.steps}, per-process batch={args.batch}, epochs={args.epochs} (last timed), "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs visible"
    )
    print()
    print("| processes | threads each | global batch | images/s | speed-up vs 1x1 | per-core efficiency |")
    print("|---|---|---|---|---|---|")
    for p, t, gb, ips, sp, eff in rows:
        print(f"| {p} | {t} | {gb} | {ips:.0f} | {sp:.2f} | {eff:.2f} |")


if __name__ == "__main__":
    main()

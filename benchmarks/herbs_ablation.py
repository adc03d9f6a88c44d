"""HERBS ablation on real Fashion-MNIST (METHODS.md §3): plain backbone vs HERBS vs the basic variants.

Every arm trains the same backbone (default ``vgg_small_bn``) with the same data order, augmentation,
optimiser, schedule and epochs; only the head and the loss differ:

- ``plain``: the backbone's own classifier, cross-entropy;
- ``herbs``: full HERBS (feature pyramid, selector, combiner, refinement);
- ``bs``: basic background suppression on the last block;
- ``refine``: basic high-temperature refinement on the last two blocks;
- ``nosel``: HERBS with the selector off (``herbs.use_selection=false``, and so the combiner that reads the
  selected tokens: ``herbs.use_combiner=false``): feature pyramid, refinement and token-averaged heads,
  no background suppression.

Test top-1 is measured on the official 10k test images (``--folder``: a stratified ``--test-fraction`` of
the tree carved with ``--data-seed``, never trained on). Cost of HERBS over its backbone, measured in
the same run on the same machine: forward time (eval mode, ``inference_mode``), parameters, and
training activation memory (bytes of the tensors autograd saves for backward in one training step;
plus peak CUDA memory on a GPU).

``--canvas S`` turns the data into cluttered translated Fashion-MNIST (as cluttered MNIST in Mnih et al.,
"Recurrent Models of Visual Attention", 2014): each garment is placed at a random position on an S x S
black canvas together with ``--fragments`` pieces (``--fragment-size`` square) cut from other images of
the same split, so that the image has background, and background that looks like other classes. The
placements are fixed per split by ``--data-seed``; every arm sees the same images.

``--folder ROOT`` trains on a class-per-folder tree of small images instead (e.g. the CIFAR-10 JPEGs),
decoded once through the toolkit's image cache. ``--seed`` sets the initialisation and the data order;
``--data-seed`` the training subset, the carved test part and the clutter, so seeds of one data set
differ only in training randomness. ``benchmarks/seeds.py`` tabulates the JSON of several seeds.

Full run (the lead):   python benchmarks/herbs_ablation.py --epochs 15
Short run (shared CPU): python benchmarks/herbs_ablation.py --epochs 1 --limit-train 6000 --limit-test 2000
With background:       python benchmarks/herbs_ablation.py --canvas 48 --limit-train 15000 --epochs 10
A photo tree:          python benchmarks/herbs_ablation.py --folder ~/data/cifar10-jpeg/train --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coarse2fine.config import HERBSConfig
from coarse2fine.data.cache import cached_images
from coarse2fine.data.fashion_mnist import FashionMNIST
from coarse2fine.data.folder import ImageFolderDataset, common_image_size
from coarse2fine.data.split import carve_test
from coarse2fine.data.transforms import BatchAugment
from coarse2fine.engine.objective import CrossEntropyObjective, logits_of
from coarse2fine.herbs import build_herbs
from coarse2fine.models import create_model

ARMS = ("plain", "herbs", "bs", "refine", "nosel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder (default: the data module's search)")
    p.add_argument("--model", default="vgg_small_bn")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--limit-train", type=int, default=None, help="first N training images (stratified order)")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--fpn-size", type=int, default=128)
    p.add_argument("--temperature-period", type=int, default=5)
    p.add_argument("--num-selects", default=None, help="K_i per stage, e.g. 0.5,0.5,0.67 (default: official)")
    p.add_argument("--lambda-dropped", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--data-seed", type=int, default=0, help="training subset, carved test part, clutter")
    p.add_argument("--folder", default=None, help="class-per-folder tree of small images instead of Fashion-MNIST")
    p.add_argument("--test-fraction", type=float, default=0.1, help="with --folder: the carved test part")
    p.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast for training and test")
    p.add_argument("--canvas", type=int, default=0, help="cluttered translated images on this canvas (0: off)")
    p.add_argument("--fragments", type=int, default=8, help="clutter pieces per image (with --canvas)")
    p.add_argument("--fragment-size", type=int, default=10)
    p.add_argument("--save-examples", default=None, help="PNG of 16 training images (with --canvas)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timing-batch", type=int, default=256)
    p.add_argument("--timing-reps", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows here (rewritten after every arm)")
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    """(train images, targets), (test images, targets), class names: Fashion-MNIST's official split, or a
    folder tree's images (uint8, from the image cache) with a stratified test part carved out."""
    if args.folder is None:
        train_set = FashionMNIST(args.root, split="train")
        test_set = FashionMNIST(args.root, split="test")
        return (
            (train_set.images, torch.as_tensor(train_set.targets)),
            (test_set.images, torch.as_tensor(test_set.targets)),
            list(train_set.classes),
        )
    files = ImageFolderDataset(args.folder)
    size = common_image_size(files.paths)
    if size is None:
        raise SystemExit(f"{args.folder}: the images do not share one size (this benchmark holds them in memory)")
    mem = cached_images(files, size, workers=2, progress=True, strict=True)
    assert mem is not None  # strict: a bad size raised
    targets = torch.as_tensor(mem.targets)
    test = torch.from_numpy(carve_test(mem.targets, list(mem.classes), args.test_fraction, seed=args.data_seed))
    return (mem.images[~test], targets[~test]), (mem.images[test], targets[test]), list(mem.classes)


def subset(images: Tensor, targets: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A class-balanced random subset of ``n`` images (all when None)."""
    if n is None or n >= len(targets):
        return images, targets
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=gen)
    classes = int(targets.max()) + 1
    per_class = math.ceil(n / classes)
    keep = torch.cat([order[targets[order] == c][:per_class] for c in range(classes)])[:n]
    return images[keep], targets[keep]


def clutter(images: Tensor, canvas: int, fragments: int, size: int, seed: int) -> Tensor:
    """Cluttered translated copies ``(N, 1, canvas, canvas)`` of uint8 ``images`` ``(N, 1, h, h)``:
    ``fragments`` random ``size`` x ``size`` pieces of other images, then the image itself, each pasted
    (pixel-wise max) at a random position; vectorised over the images."""
    n, h = images.shape[0], images.shape[-1]
    if canvas < h or size > h:
        raise SystemExit(f"--canvas {canvas} must be >= the image size {h} >= --fragment-size {size}")
    gen = torch.Generator().manual_seed(seed)
    src = images[:, 0]
    out = torch.zeros(n, canvas, canvas, dtype=torch.uint8)
    who = torch.arange(n).view(n, 1, 1)

    def window(limit: int, s: int) -> tuple[Tensor, Tensor]:
        """Row and column indices of a random ``s`` x ``s`` window inside ``limit`` x ``limit``, per image."""
        oy, ox = (torch.randint(0, limit - s + 1, (n, 1, 1), generator=gen) for _ in range(2))
        ar = torch.arange(s)
        return oy + ar.view(1, s, 1), ox + ar.view(1, 1, s)

    for _ in range(fragments):
        other = torch.randint(0, n, (n, 1, 1), generator=gen)
        r, c = window(h, size)
        piece = src[other, r, c]
        r, c = window(canvas, size)
        out[who, r, c] = torch.maximum(out[who, r, c], piece)
    r, c = window(canvas, h)
    out[who, r, c] = torch.maximum(out[who, r, c], src)
    return out.unsqueeze(1)


def save_examples(images: Tensor, path: str) -> None:
    """16 images spread evenly over the set (so over the classes) as a 4 x 4 grid PNG."""
    from PIL import Image

    grid = images[torch.linspace(0, len(images) - 1, 16).long(), 0]
    s = grid.shape[-1]
    grid = grid.view(4, 4, s, s).permute(0, 2, 1, 3).reshape(4 * s, 4 * s)
    Image.fromarray(grid.numpy()).resize((8 * s, 8 * s), Image.NEAREST).save(path)


def make_arm(arm: str, args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(model, objective, backbone) for one arm; the backbone is initialised from the same seed."""
    torch.manual_seed(args.seed)
    size, chans = args.size, args.chans
    backbone = create_model(args.model, num_classes=num_classes, in_chans=chans, input_size=size)
    if arm == "plain":
        return backbone, CrossEntropyObjective(), backbone
    selects = [float(v) for v in args.num_selects.split(",")] if args.num_selects else None
    if selects and arm == "bs":
        selects = selects[-1:]  # the last block only
    cfg = HERBSConfig(
        fpn_size=args.fpn_size,
        temperature_period=args.temperature_period,
        num_selects=selects,
        lambda_dropped=args.lambda_dropped,
        basic=arm if arm in ("bs", "refine") else None,
        use_selection=arm != "nosel",
        use_combiner=arm != "nosel",  # the combiner reads the selected tokens (the official code asserts it)
    )
    model, objective = build_herbs(backbone, num_classes, cfg, input_size=(chans, size, size))
    return model, objective, backbone


def amp(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the run's device (``--amp bf16``), else nothing."""
    if args.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


def accuracy(model: nn.Module, images: Tensor, targets: Tensor, norm: BatchAugment, args: argparse.Namespace) -> float:
    model.eval()
    correct = 0
    device = args.device
    with torch.inference_mode(), amp(args):
        for i in range(0, len(targets), 1000):
            x = norm(images[i : i + 1000]).to(device)
            correct += int((logits_of(model(x)).argmax(-1).cpu() == targets[i : i + 1000]).sum())
    return correct / len(targets)


def train(
    model: nn.Module,
    objective: nn.Module,
    data: tuple[Tensor, Tensor],
    args: argparse.Namespace,
    aug: BatchAugment,
) -> float:
    """SGD nesterov + one-cycle; the same data order for every arm. Returns seconds per epoch."""
    images, targets = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    steps = args.epochs * (len(targets) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, steps))
    model.to(args.device)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        objective.set_epoch(epoch)
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(targets), generator=gen)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i : i + args.batch_size]
            x = aug(images[idx], gen).to(args.device)
            y = targets[idx].to(args.device)
            with amp(args):
                loss = objective(model(x), y)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {epoch + 1}/{args.epochs}: last loss {loss.item():.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return (time.perf_counter() - start) / max(1, args.epochs)


def forward_time(model: nn.Module, x: Tensor, reps: int) -> float:
    model.eval()
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(reps):
            if x.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def activation_bytes(model: nn.Module, objective: nn.Module, x: Tensor, y: Tensor) -> tuple[int, int]:
    """(bytes saved for backward in one training step, peak CUDA bytes or 0)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective(model(x), y)["loss"]
    loss.backward()
    model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if x.is_cuda else 0
    return sum(seen.values()), peak


def n_params(model: nn.Module, trainable: bool = True) -> int:
    """Parameters that train (HERBS freezes the backbone classifier it never uses)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {ARMS}")
    (xtr, ytr), (xte, yte), classes = load_data(args)
    ds = args.data_seed
    xtr, ytr = subset(xtr, ytr, args.limit_train, ds)
    xte, yte = subset(xte, yte, args.limit_test, ds + 1)
    if args.canvas:
        xtr = clutter(xtr, args.canvas, args.fragments, args.fragment_size, ds + 2)
        xte = clutter(xte, args.canvas, args.fragments, args.fragment_size, ds + 3)
        if args.save_examples:
            save_examples(xtr, args.save_examples)
    size = args.size = int(xtr.shape[-1])
    args.chans = int(xtr.shape[1])
    pix = xtr.float().div(255)
    mean, std = pix.mean((0, 2, 3)).tolist(), pix.std((0, 2, 3)).tolist()
    aug = BatchAugment(mean, std, size=size, train=True, pad=2 if args.folder is None else 4, flip=True)
    norm = BatchAugment(mean, std, size=size, train=False)
    num_classes = len(classes)

    rows: list[dict[str, Any]] = []
    x_time = norm(xte[: args.timing_batch]).to(args.device)
    x_mem, y_mem = norm(xtr[: args.batch_size]).to(args.device), ytr[: args.batch_size].to(args.device)
    for arm in arms:
        model, objective, backbone = make_arm(arm, args, num_classes)
        model.to(args.device)
        objective.to(args.device)
        # cost before training (weights do not change the cost)
        t_model = forward_time(model, x_time, args.timing_reps)
        t_backbone = forward_time(backbone, x_time, args.timing_reps)
        act, peak = activation_bytes(model, objective, x_mem, y_mem)
        act_b, peak_b = activation_bytes(backbone, CrossEntropyObjective().to(args.device), x_mem, y_mem)
        sec = train(model, objective, (xtr, ytr), args, aug)
        rows.append(
            {
                "arm": arm,
                "top1": accuracy(model, xte, yte, norm, args),
                "sec_epoch": sec,
                "time_ratio": t_model / t_backbone,
                "ms": 1000 * t_model,
                "params": n_params(model),
                "param_ratio": n_params(model) / n_params(backbone, trainable=False),
                "act_ratio": act / act_b,
                "peak_ratio": (peak / peak_b) if peak_b else float("nan"),
            }
        )
        print(f"done: {rows[-1]}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    data = f"Fashion-MNIST {size} x {size}" if args.folder is None else f"{args.folder} {size} x {size}"
    if args.canvas:
        data = f"Fashion-MNIST cluttered {size} x {size} ({args.fragments} pieces of {args.fragment_size} px)"
    print(
        f"\n{data}, seed {args.seed}, amp {args.amp}, backbone {args.model}, {args.epochs} epoch(s), "
        f"{len(ytr)} training / {len(yte)} "
        f"test images, batch {args.batch_size}, device {args.device}\n"
    )
    print(table(rows, args.timing_batch))


def table(rows: list[dict[str, Any]], timing_batch: int) -> str:
    """The markdown table; accuracy deltas are against the ``plain`` arm of the same run."""
    base = next((r["top1"] for r in rows if r["arm"] == "plain"), None)
    lines = [
        f"| arm | test top-1 | vs plain (points) | s/epoch | forward ms (batch {timing_batch}) | "
        "forward time / backbone | trained params | params / backbone | activation memory / backbone | "
        "peak CUDA memory / backbone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{100 * (r['top1'] - base):+.2f}" if base is not None else "n/a"
        lines.append(
            f"| {r['arm']} | {100 * r['top1']:.2f} % | {delta} | {r['sec_epoch']:.1f} | {r['ms']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['params'] / 1e6:.2f} M | {r['param_ratio']:.2f} | "
            f"{r['act_ratio']:.2f} | {r['peak_ratio']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

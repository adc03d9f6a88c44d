"""Training and inference throughput of the building blocks on the CPU (docs/BENCHMARKS.md).

For each model: images/s and achieved GFLOP/s (FlopCounterMode: 2 per multiply-add, forward +
backward for training) at a given batch, channels_last, fp32; as a fraction of this machine's
fp32 matmul peak (square ``torch.mm``, measured in the same run); and as a ratio against
torchvision's VGG of the same configuration. For the small VGGs torchvision has no model, so the
reference is the torchvision way of building one: ``torchvision.models.vgg.make_layers`` with the
same layer list, ``AdaptiveAvgPool2d`` to the final map and the same FC head (nn.Sequential).

    .venv/bin/python benchmarks/throughput.py                       # short run (a few iterations)
    .venv/bin/python benchmarks/throughput.py --iters 20 --warmup 3  # the full version
    .venv/bin/python benchmarks/throughput.py --memory-format contiguous --models vgg_small_bn
    .venv/bin/python benchmarks/throughput.py --clock cpu   # per core, in CPU time: for a busy machine
    .venv/bin/python benchmarks/throughput.py --conv-shapes 24-24@28 48-48@14 96-96@7  # kernels alone
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import vgg as tv_vgg

from coarse2fine.models import create_model


@dataclass
class Case:
    name: str  # our model name
    in_chans: int
    size: int
    reference: str | None  # torchvision model name, "small:<cfg>" for the make_layers twin, or None
    batch: int = 128


CASES = {
    "vgg_small_bn": Case("vgg_small_bn", 1, 28, "small"),
    "vgg_small": Case("vgg_small", 1, 28, "small"),
    "vgg_small_fast_bn": Case("vgg_small_fast_bn", 1, 28, "small"),
    "vgg_small_fast": Case("vgg_small_fast", 1, 28, "small"),
    "vgg16_small_bn": Case("vgg16_small_bn", 3, 32, "small"),
    "vgg11": Case("vgg11", 3, 64, "vgg11"),
    "vgg11_bn": Case("vgg11_bn", 3, 64, "vgg11_bn"),
    "nin": Case("nin", 3, 32, None),
}


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matrix product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


CLOCK: Callable[[], float] = time.perf_counter


def _timed(fn: Callable[[], object]) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def torchvision_twin(ours: nn.Module, reference: str, num_classes: int) -> nn.Module:
    """torchvision's model, or for small VGGs the same layers built the torchvision way."""
    if reference != "small":
        return getattr(tv_vgg, reference)(num_classes=num_classes)
    cfg: list[int | str] = []
    bn = False
    for i in range(1, ours.num_stages + 1):
        stage = getattr(ours, f"stage{i}")
        cfg += [m.out_channels for m in stage if isinstance(m, nn.Conv2d)]
        bn = bn or any(isinstance(m, nn.BatchNorm2d) for m in stage)
        if any(isinstance(m, nn.MaxPool2d) for m in stage):
            cfg.append("M")
    first = ours.stage1.conv1.in_channels
    features = tv_vgg.make_layers(cfg, batch_norm=bn)
    if first != 3:
        features[0] = nn.Conv2d(first, features[0].out_channels, 3, padding=1)
    _, h, w = ours.final_map
    head = ours.head
    return nn.Sequential(
        features, nn.AdaptiveAvgPool2d((h, w)), nn.Flatten(1),
        *[copy.deepcopy(m) for m in head.children() if not isinstance(m, nn.Flatten)],
    )


def flops_per_image(model: nn.Module, shape: tuple[int, ...], train: bool) -> float:
    x = torch.randn(2, *shape)
    counter = FlopCounterMode(display=False)
    model.train(train)
    with counter:
        out = model(x)
        if train:
            F.cross_entropy(out, torch.zeros(2, dtype=torch.long)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def measure(
    model: nn.Module, case: Case, num_classes: int, warmup: int, iters: int, fmt: torch.memory_format
) -> dict[str, float]:
    model = model.to(memory_format=fmt)
    shape = (case.in_chans, case.size, case.size)
    x = torch.randn(case.batch, *shape).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (case.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(warmup):
        step()
    train_t = statistics.median(_timed(step) for _ in range(iters))
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        infer_t = statistics.median(_timed(lambda: model(x)) for _ in range(iters))
    return {
        "train_ips": case.batch / train_t,
        "infer_ips": case.batch / infer_t,
        "train_gflops": flops_per_image(model, shape, True) * case.batch / train_t / 1e9,
        "infer_gflops": flops_per_image(model, shape, False) * case.batch / infer_t / 1e9,
    }


def conv_ceiling(shapes: list[str], batch: int, iters: int, fmt: torch.memory_format) -> list[dict[str, float]]:
    """Forward and backward (input + weight gradients) of single 3x3 convs ``CIN-COUT@HW``: how close the
    library's kernels alone come to the matmul peak (a network of them cannot do better)."""
    out = []
    for shape in shapes:
        chans, _, hw = shape.partition("@")
        cin, cout = (int(c) for c in chans.split("-"))
        size = int(hw)
        conv = nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=fmt)
        x = torch.randn(batch, cin, size, size).contiguous(memory_format=fmt).requires_grad_()
        grad = torch.randn(batch, cout, size, size).contiguous(memory_format=fmt)
        flops = 2 * batch * size * size * cin * cout * 9
        fwd, bwd = [], []
        for i in range(iters + 2):
            t0 = CLOCK()
            y = conv(x)
            t1 = CLOCK()
            y.backward(grad)
            t2 = CLOCK()
            if i >= 2:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        f, b = statistics.median(fwd), statistics.median(bwd)
        gflops = {"fwd": flops / f / 1e9, "bwd": 2 * flops / b / 1e9, "total": 3 * flops / (f + b) / 1e9}
        out.append({"shape": shape, **gflops})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg_small_bn", "vgg16_small_bn", "vgg11"],
                        choices=sorted(CASES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: one thread timed by its own CPU time (robust to other jobs on a shared machine)")
    parser.add_argument("--conv-shapes", nargs="*", default=None, metavar="CIN-COUT@HW",
                        help="instead of models: time single 3x3 convs (e.g. 24-24@28 48-48@14) against the peak")
    args = parser.parse_args()
    fmt = getattr(torch, args.memory_format.replace("contiguous", "contiguous_format"))
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.thread_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the peak is measured before, between and after the models and the best is used: on a shared
    # machine a single measurement can land in a slow moment and inflate every "% peak"
    peaks = [matmul_peak()]
    if args.conv_shapes:
        convs = conv_ceiling(args.conv_shapes, args.batch, args.iters, fmt)
        peaks.append(matmul_peak())
        peak = max(peaks)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s "
              f"(best of {len(peaks)}); {args.clock} clock, {args.memory_format}, batch {args.batch}, "
              f"iters {args.iters} (median)\n")
        print("| 3x3 conv | forward % peak | backward % peak | forward + backward % peak |")
        print("|---|---|---|---|")
        for r in convs:
            print(f"| {r['shape']} | {100 * r['fwd'] / peak:.0f}% | {100 * r['bwd'] / peak:.0f}% | "
                  f"{100 * r['total'] / peak:.0f}% |")
        return
    results = []
    for name in args.models:
        case = CASES[name]
        case.batch = args.batch
        ours = create_model(name, args.classes, in_chans=case.in_chans, input_size=case.size)
        rows = [("ours", measure(ours, case, args.classes, args.warmup, args.iters, fmt))]
        if case.reference:
            ref = torchvision_twin(ours, case.reference, args.classes)
            label = f"torchvision {case.reference}" if case.reference != "small" else "torchvision make_layers"
            rows.append((label, measure(ref, case, args.classes, args.warmup, args.iters, fmt)))
        results.append((name, case, rows))
        peaks.append(matmul_peak())
    peak = max(peaks)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s (best of {len(peaks)} measurements, lowest {min(peaks):.1f}); "
          f"{args.clock} clock, {args.memory_format}, batch {args.batch}, warmup {args.warmup}, iters {args.iters} "
          "(median)")
    print()
    print("| model | input | impl | train img/s | train GFLOP/s | train % peak | infer img/s | infer GFLOP/s "
          "| infer % peak | ours / torchvision (train, infer) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, case, rows in results:
        for i, (impl, r) in enumerate(rows):
            ratio = ""
            if i == 0 and len(rows) > 1:
                ref_r = rows[1][1]
                ratio = f"{r['train_ips'] / ref_r['train_ips']:.2f}x, {r['infer_ips'] / ref_r['infer_ips']:.2f}x"
            print(f"| {name} | {case.in_chans}x{case.size}x{case.size} | {impl} | {r['train_ips']:.0f} | "
                  f"{r['train_gflops']:.1f} | {100 * r['train_gflops'] / peak:.0f}% | {r['infer_ips']:.0f} | "
                  f"{r['infer_gflops']:.1f} | {100 * r['infer_gflops'] / peak:.0f}% | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

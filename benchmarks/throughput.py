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
    .venv/bin/python benchmarks/throughput.py --clock cpu --models vgg_small_bn --no-reference \\
        --variants fp32 mkldnn-bf16 bf16 compile batch=256       # levers, taking turns in one run

Kernel ceiling (every model run): the model's convolution and linear layers are timed alone (forward
and backward at the same batch, layout, precision and clock; the first layer without an input
gradient, as in the network), in turns with the whole training step. The ceiling is the GFLOP/s the
model would reach if its step cost only those layers: their FLOPs / the sum of their times, i.e. each
layer's rate weighted by its share of the FLOPs. ``train / ceiling`` is the share of it the full step
reaches; the rest is BatchNorm, ReLU, pooling, the loss and the optimizer.

Variants (``--variants``; ``+`` joins levers): ``fp32``; ``bf16`` (``torch.autocast`` bf16);
``mkldnn-bf16`` (``torch.backends.mkldnn.fp32_precision = "bf16"``: oneDNN may compute fp32
convolutions and matmuls in bf16); ``compile`` (``torch.compile`` of the model, inductor); ``compile-step``
(``torch.compile`` of the whole step: forward, loss, backward and the SGD update); ``batch=N``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class Variant:
    label: str
    amp: bool = False  # bf16 autocast
    precision: str = "none"  # torch.backends.mkldnn.fp32_precision
    compile: bool = False
    compile_step: bool = False  # torch.compile of the whole step (forward, loss, backward, SGD update)
    batch: int | None = None  # None: --batch


def parse_variant(text: str) -> Variant:
    v = Variant(text)
    for part in text.split("+"):
        if part == "fp32":
            continue
        if part == "bf16":
            v = replace(v, amp=True)
        elif part.startswith("mkldnn-"):
            v = replace(v, precision=part.removeprefix("mkldnn-"))
        elif part == "compile":
            v = replace(v, compile=True)
        elif part == "compile-step":
            v = replace(v, compile_step=True)
        elif part.startswith("batch="):
            v = replace(v, batch=int(part.removeprefix("batch=")))
        else:
            raise SystemExit(
                f"unknown variant part {part!r}: fp32, bf16, mkldnn-bf16, mkldnn-tf32, compile, compile-step, batch=N"
            )
    return v


@contextlib.contextmanager
def applied(v: Variant) -> Iterator[None]:
    """The variant's process-wide settings (oneDNN fp32 precision) while its arms are timed."""
    old = torch.backends.mkldnn.fp32_precision
    torch.backends.mkldnn.fp32_precision = v.precision
    try:
        yield
    finally:
        torch.backends.mkldnn.fp32_precision = old


def _autocast(v: Variant) -> contextlib.AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if v.amp else contextlib.nullcontext()


def flop_layers(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[nn.Module, tuple[int, ...], bool]]:
    """(layer, input shape without the batch, input needs a gradient) of every Conv2d and Linear, in order."""
    found: list[tuple[nn.Module, tuple[int, ...], bool]] = []
    hooks = [
        m.register_forward_hook(lambda m, inp, out: found.append((m, tuple(inp[0].shape[1:]), inp[0].requires_grad)))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    model.train()
    try:
        model(torch.randn(2, *shape))
    finally:
        for h in hooks:
            h.remove()
    return found


def layer_step(layer: nn.Module, in_shape: tuple[int, ...], needs_grad: bool, batch: int, v: Variant,
               fmt: torch.memory_format) -> tuple[Callable[[], None], float]:
    """One layer's forward + backward as the network runs it, and its FLOPs per image (FlopCounterMode)."""
    layer = copy.deepcopy(layer)
    dtype = torch.bfloat16 if v.amp else torch.float32
    x = torch.randn(batch, *in_shape, dtype=dtype)
    if x.ndim == 4:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_(needs_grad)
    with _autocast(v):
        y = layer(x)
    grad = torch.randn_like(y)

    def step() -> None:
        with _autocast(v):
            out = layer(x)
        out.backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return step, counter.get_total_flops() / batch


def model_step(model: nn.Module, shape: tuple[int, ...], batch: int, num_classes: int, v: Variant,
               fmt: torch.memory_format) -> Callable[[], None]:
    """One SGD training step (forward, cross-entropy, backward, update) on a fixed random batch."""
    net = torch.compile(model) if v.compile else model
    x = torch.randn(batch, *shape).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        with _autocast(v):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return torch.compile(step) if v.compile_step else step


@dataclass
class Arms:
    """The timed functions of one (model, variant): the whole step and each FLOP layer alone."""

    variant: Variant
    batch: int
    step: Callable[[], None]
    layers: list[tuple[Callable[[], None], float]]
    flops: float  # per image, forward + backward (the model's, FlopCounterMode)
    compile_s: float = 0.0
    step_t: list[float] | None = None
    layer_t: list[list[float]] | None = None


def build_arms(name: str, case: Case, v: Variant, classes: int, fmt: torch.memory_format, warmup: int) -> Arms:
    batch = v.batch or case.batch
    shape = (case.in_chans, case.size, case.size)
    torch.manual_seed(0)
    model = create_model(name, classes, in_chans=case.in_chans, input_size=case.size).to(memory_format=fmt)
    flops = flops_per_image(model, shape, True)
    with applied(v):
        layers = [layer_step(m, s, g, batch, v, fmt) for m, s, g in flop_layers(model, shape)]
        step = model_step(model, shape, batch, classes, v, fmt)
        t0 = time.perf_counter()
        step()  # compiles when v.compile
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            step()
            for fn, _ in layers:
                fn()
    return Arms(v, batch, step, layers, flops, compile_s, [], [[] for _ in layers])


def time_in_turns(arms: list[Arms], rounds: int, iters: int) -> None:
    """``rounds`` times: every variant's step ``iters`` times, then each of its layers ``iters`` times."""
    for _ in range(rounds):
        for a in arms:
            with applied(a.variant):
                a.step_t.append(statistics.median(_timed(a.step) for _ in range(iters)))
                for (fn, _), times in zip(a.layers, a.layer_t):
                    times.append(statistics.median(_timed(fn) for _ in range(iters)))


def ceiling_row(a: Arms) -> dict[str, float]:
    step_t = statistics.median(a.step_t)
    layer_flops = sum(f for _, f in a.layers) * a.batch
    layer_time = sum(statistics.median(t) for t in a.layer_t)
    return {
        "train_ips": a.batch / step_t,
        "train_gflops": a.flops * a.batch / step_t / 1e9,
        "ceiling_gflops": layer_flops / layer_time / 1e9,
        "share": layer_time / step_t * a.flops / (layer_flops / a.batch),  # = train GFLOP/s / ceiling
        "covered": layer_flops / a.batch / a.flops,  # the layers' FLOPs / the model's (should be 1.0)
    }


def run_variants(args: argparse.Namespace, fmt: torch.memory_format, peak_fn: Callable[[], float]) -> None:
    variants = [parse_variant(t) for t in args.variants]
    peaks = [peak_fn()]
    rows = []
    for name in args.models:
        case = replace(CASES[name], batch=args.batch)
        arms = [build_arms(name, case, v, args.classes, fmt, args.warmup) for v in variants]
        time_in_turns(arms, args.rounds, args.iters)
        rows.append((name, case, arms))
        peaks.append(peak_fn())
    peak = max(peaks)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s (best of {len(peaks)}); {args.clock} clock, {args.memory_format}, "
          f"warmup {args.warmup}, {args.rounds} rounds of {args.iters} iters in turns (median)\n")
    print("| model | variant | batch | train img/s | train GFLOP/s | train % fp32 peak | layers-alone ceiling GFLOP/s "
          "| train / ceiling | img/s vs first variant | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, _, arms in rows:
        base = None
        for a in arms:
            r = ceiling_row(a)
            base = base or r["train_ips"]
            compiled = a.variant.compile or a.variant.compile_step
            print(f"| {name} | {a.variant.label} | {a.batch} | {r['train_ips']:.0f} | {r['train_gflops']:.1f} | "
                  f"{100 * r['train_gflops'] / peak:.0f}% | {r['ceiling_gflops']:.1f} | {r['share']:.2f} | "
                  f"{r['train_ips'] / base:.2f}x | {a.compile_s if compiled else 0:.0f} |", flush=True)


def run_models(args: argparse.Namespace, fmt: torch.memory_format, peak_fn: Callable[[], float]) -> None:
    """Our models against torchvision's build of the same layers, with the layers-alone ceiling (fp32)."""
    peaks = [peak_fn()]
    results = []
    fp32 = Variant("fp32")
    for name in args.models:
        case = replace(CASES[name], batch=args.batch)
        ours = create_model(name, args.classes, in_chans=case.in_chans, input_size=case.size)
        rows = [("ours", measure(ours, case, args.classes, args.warmup, args.iters, fmt))]
        arms = build_arms(name, case, fp32, args.classes, fmt, args.warmup)
        time_in_turns([arms], args.rounds, args.iters)
        ceiling = ceiling_row(arms)  # its own step times, in turns with the layers
        rows[0][1].update(ceiling_gflops=ceiling["ceiling_gflops"], share=ceiling["share"])
        if case.reference and args.reference:
            ref = torchvision_twin(ours, case.reference, args.classes)
            label = f"torchvision {case.reference}" if case.reference != "small" else "torchvision make_layers"
            rows.append((label, measure(ref, case, args.classes, args.warmup, args.iters, fmt)))
        results.append((name, case, rows))
        peaks.append(peak_fn())
    peak = max(peaks)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s (best of {len(peaks)} measurements, lowest {min(peaks):.1f}); "
          f"{args.clock} clock, {args.memory_format}, batch {args.batch}, warmup {args.warmup}, iters {args.iters} "
          f"(median); ceiling: {args.rounds} rounds in turns with the step")
    print()
    print("| model | input | impl | train img/s | train GFLOP/s | train % peak | infer img/s | infer GFLOP/s "
          "| infer % peak | ours / torchvision (train, infer) | layers-alone ceiling GFLOP/s | train / ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, case, rows in results:
        for i, (impl, r) in enumerate(rows):
            ratio = ""
            if i == 0 and len(rows) > 1:
                ref_r = rows[1][1]
                ratio = f"{r['train_ips'] / ref_r['train_ips']:.2f}x, {r['infer_ips'] / ref_r['infer_ips']:.2f}x"
            ceil = f"{r['ceiling_gflops']:.1f} | {r['share']:.2f}" if "share" in r else " | "
            print(f"| {name} | {case.in_chans}x{case.size}x{case.size} | {impl} | {r['train_ips']:.0f} | "
                  f"{r['train_gflops']:.1f} | {100 * r['train_gflops'] / peak:.0f}% | {r['infer_ips']:.0f} | "
                  f"{r['infer_gflops']:.1f} | {100 * r['infer_gflops'] / peak:.0f}% | {ratio} | {ceil} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg_small_bn", "vgg16_small_bn", "vgg11"],
                        choices=sorted(CASES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="turns of (step, layers alone) for the ceiling")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: one thread timed by its own CPU time (robust to other jobs on a shared machine)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torchvision's build of the same layers")
    parser.add_argument("--variants", nargs="+", default=None, metavar="LEVER[+LEVER]",
                        help="instead of the model table: these settings in turns, e.g. fp32 bf16 mkldnn-bf16 "
                             "compile batch=256 (see the module docstring)")
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
    print(f"command: {' '.join(sys.argv)}")
    print(f"load average at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    # the peak is measured before, between and after the models and the best is used: on a shared
    # machine a single measurement can land in a slow moment and inflate every "% peak"
    if args.conv_shapes:
        peaks = [matmul_peak()]
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
    elif args.variants:
        run_variants(args, fmt, matmul_peak)
    else:
        run_models(args, fmt, matmul_peak)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

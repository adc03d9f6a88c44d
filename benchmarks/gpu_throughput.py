"""GPU training throughput: our engine's training step against a bare loop, with and without torch.compile.

    python benchmarks/gpu_throughput.py [--models vgg16_bn resnet50 herbs_swin_t hdcnn_nin] [--steps 20]
    python benchmarks/gpu_throughput.py --tiny      # small sizes, few steps: runs on the CPU (the test uses it)

Models: VGG-16-BN at 224 px (ours), a timm ResNet-50 (``timm/resnet50`` through our factory), HERBS on
a timm Swin-T (``build_herbs`` around ``create_model("timm/swin_tiny_patch4_window7_224")``) and HD-CNN
on the CIFAR-style NIN (``HDCNN`` around ``create_model("nin")``, four overlapping partial sets,
branching after stage1), each with bf16 autocast and channels_last, random data already on the device.

Arms, per model, all in one run and taking turns (every arm is built and warmed up first, then
``--rounds`` rounds time ``--steps`` steps of each arm in turn; the median round counts):

- ``engine``: ``engine.trainer.train_one_epoch``, the step ``fit`` runs (device transfer, autocast, the
  objective, the non-finite check, epoch meters, progress bar, optimizer step, per-step schedule),
  compiled the way ``fit`` compiles (``torch.compile(model)``) when ``compile`` is on;
- ``bare``: the loop the way timm's ``train.py`` runs it: ``.to(device)`` + channels_last, forward and
  loss under ``torch.autocast``, ``backward``, ``optimizer.step``, ``zero_grad``, no host sync except
  ``loss.item()`` every ``--log-interval`` steps. Same model, batch, objective and optimizer (SGD with
  momentum and Nesterov, no weight decay on norm and bias parameters: the engine's ``build_optimizer``).

Reported: training images/s, engine / bare (same compile setting), compiled / eager, the first step's
seconds (compilation) and the peak memory of each arm (``torch.cuda.max_memory_allocated`` during its
warm-up, minus what was allocated before it was built: its weights, gradients, optimizer state and
activations).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from coarse2fine.config import HERBSConfig, OptimConfig, ScheduleConfig, TrainConfig
from coarse2fine.engine import CrossEntropyObjective, FitSetup, Objective, RunFolder, build_optimizer, build_scheduler
from coarse2fine.engine.trainer import Training, _StopRequest, train_one_epoch
from coarse2fine.hdcnn import HDCNN, HDCNNObjective
from coarse2fine.herbs import build_herbs
from coarse2fine.models import create_model


@dataclass(frozen=True)
class Case:
    build: Callable[[bool], tuple[nn.Module, Objective]]  # tiny -> (model, objective)
    size: int
    batch: int
    classes: int
    tiny_size: int = 32
    tiny_batch: int = 2
    tiny_classes: int = 5


def _vgg16_bn(tiny: bool) -> tuple[nn.Module, Objective]:
    if tiny:  # the same 13 conv + BN layers and 3 FC layers, a quarter of the widths
        return create_model("vgg16_bn", 5, input_size=32, width_mult=0.25, hidden=(64, 64)), CrossEntropyObjective()
    return create_model("vgg16_bn", 1000, input_size=224), CrossEntropyObjective()


def _resnet50(tiny: bool) -> tuple[nn.Module, Objective]:
    return create_model("timm/resnet50", 5 if tiny else 1000), CrossEntropyObjective()


def _herbs_swin_t(tiny: bool) -> tuple[nn.Module, Objective]:
    if tiny:  # a real timm Swin, one block per stage, width 24 (as tests/test_models.py's tiny_swin)
        swin = create_model("timm/swin_tiny_patch4_window7_224", 5, img_size=32, window_size=2, embed_dim=24,
                            depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
        return build_herbs(swin, 5, HERBSConfig(fpn_size=16), 32)
    swin = create_model("timm/swin_tiny_patch4_window7_224", 200)
    return build_herbs(swin, 200, HERBSConfig(), 224)


def _partial_sets(classes: int, k: int) -> list[list[int]]:
    """``k`` contiguous groups of the classes, each overlapping the next by a few classes."""
    width = math.ceil(classes / k)
    overlap = max(1, width // 8)
    return [list(range(max(0, i * width - overlap), min(classes, (i + 1) * width))) for i in range(k)]


def _hdcnn_nin(tiny: bool) -> tuple[nn.Module, Objective]:
    classes, k = (8, 3) if tiny else (100, 4)
    block = create_model("nin", classes, input_size=32)
    sets = _partial_sets(classes, k)
    model = HDCNN(block, sets, "stage1")
    sizes = torch.tensor([len(s) for s in sets], dtype=torch.float32)
    return model, HDCNNObjective(sizes / sizes.sum(), consistency_weight=20.0)


CASES: dict[str, Case] = {
    "vgg16_bn": Case(_vgg16_bn, 224, 64, 1000),
    "resnet50": Case(_resnet50, 224, 128, 1000),
    "herbs_swin_t": Case(_herbs_swin_t, 224, 32, 200),
    "hdcnn_nin": Case(_hdcnn_nin, 32, 256, 100, tiny_batch=4, tiny_classes=8),
}


@dataclass
class Arm:
    model_name: str
    loop: str  # "engine" | "bare"
    compiled: bool
    batch: int
    size: int
    run: Callable[[int], None] | None  # run n steps (dropped once timed, freeing the model)
    first_step_s: float = 0.0
    peak_bytes: int = 0
    times: list[float] = field(default_factory=list)
    error: str = ""  # why this arm could not be built or run (e.g. a model torch.compile cannot trace)

    @property
    def images_per_s(self) -> float:
        return self.batch / statistics.median(self.times) if self.times else float("nan")


class _Repeat:
    """A loader of ``n`` copies of one batch (``len`` and ``set_epoch`` as the engine expects)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((self.x, self.y) for _ in range(self.n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_runner(model: nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor, compiled: bool,
                  backend: str, device: torch.device, workdir: str, progress: bool) -> Callable[[int], None]:
    """``train_one_epoch`` over ``n`` batches, on a ``Training`` set up as ``fit`` sets it up."""
    train = TrainConfig(epochs=1, amp="bf16", channels_last=True, compile=compiled, log_every=50)
    optim = OptimConfig(name="sgd", lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5)
    setup = FitSetup(train, optim, ScheduleConfig(name="cosine"), [str(i) for i in range(int(y.max()) + 1)],
                     desc="engine", progress=progress)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, setup.schedule, 10**6, 1)
    net = torch.compile(model, backend=backend) if compiled else model
    t = Training(net, objective, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=False), setup,
                 RunFolder(workdir), device, torch.bfloat16, _StopRequest(), [])
    epoch = [0]

    def run(n: int) -> None:
        train_one_epoch(t, _Repeat(x, y, n), epoch[0])
        epoch[0] += 1

    return run


def bare_runner(model: nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor, compiled: bool,
                backend: str, device: torch.device, log_interval: int) -> Callable[[int], None]:
    """timm ``train.py``'s loop: no host sync but ``loss.item()`` at the log interval."""
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.01, momentum=0.9, nesterov=True,
                                                   weight_decay=5e-5))
    net = torch.compile(model, backend=backend) if compiled else model
    net.train()
    step = [0]

    def run(n: int) -> None:
        for _ in range(n):
            images = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            target = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = objective(net(images), target)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step[0] += 1
            if step[0] % log_interval == 0:
                loss.item()

    return run


def build_arm(name: str, loop: str, compiled: bool, args: argparse.Namespace, device: torch.device,
              workdir: str) -> Arm:
    case = CASES[name]
    size = case.tiny_size if args.tiny else case.size
    batch = args.batch or (case.tiny_batch if args.tiny else case.batch)
    classes = case.tiny_classes if args.tiny else case.classes
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    model, objective = case.build(args.tiny)
    model = model.to(device, memory_format=torch.channels_last)
    objective = objective.to(device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    if loop == "engine":
        run = engine_runner(model, objective, x, y, compiled, args.backend, device, workdir, args.progress)
    else:
        run = bare_runner(model, objective, x, y, compiled, args.backend, device, args.log_interval)
    arm = Arm(name, loop, compiled, batch, size, run)
    t0 = time.perf_counter()
    run(1)  # compiles when compiled
    _sync(device)
    arm.first_step_s = time.perf_counter() - t0
    run(args.warmup)
    _sync(device)
    if device.type == "cuda":
        arm.peak_bytes = torch.cuda.max_memory_allocated(device) - before
    print(f"built {name} {loop} compile={compiled}: first step {arm.first_step_s:.1f} s", file=sys.__stderr__,
          flush=True)
    return arm


def benchmark(args: argparse.Namespace) -> list[Arm]:
    """Every (model, compile, loop) arm, timed in turns; the arms with their times."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    arms: list[Arm] = []
    quiet = contextlib.redirect_stderr(io.StringIO()) if not args.progress else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, quiet:
        for name in args.models:
            group = [_guarded_build(name, loop, compiled, args, device, tmp)
                     for compiled in args.compile for loop in ("engine", "bare")]
            for r in range(args.rounds):
                for arm in group if r % 2 == 0 else group[::-1]:
                    _time_round(arm, args.steps, device)
            for arm in group:
                arm.run = None
            arms += group
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return arms


def _guarded_build(name: str, loop: str, compiled: bool, args: argparse.Namespace, device: torch.device,
                   workdir: str) -> Arm:
    """``build_arm``, or an arm that records why it failed (the other arms still run)."""
    try:
        return build_arm(name, loop, compiled, args, device, workdir)
    except Exception as exc:  # e.g. torch.compile cannot trace a model, or out of memory
        print(f"{name} {loop} compile={compiled} failed: {type(exc).__name__}: {exc}", file=sys.__stderr__)
        case = CASES[name]
        size, batch = (case.tiny_size, case.tiny_batch) if args.tiny else (case.size, case.batch)
        return Arm(name, loop, compiled, args.batch or batch, size, None, error=f"{type(exc).__name__}")


def _time_round(arm: Arm, steps: int, device: torch.device) -> None:
    if arm.run is None:
        return
    try:
        _sync(device)
        t0 = time.perf_counter()
        arm.run(steps)
        _sync(device)
        arm.times.append((time.perf_counter() - t0) / steps)
    except Exception as exc:
        print(f"{arm.model_name} {arm.loop} compile={arm.compiled} failed: {exc}", file=sys.__stderr__)
        arm.error, arm.run = type(exc).__name__, None


def table(arms: list[Arm]) -> str:
    """The markdown table: one row per arm, engine / bare and compiled / eager within the same model."""
    rate = {(a.model_name, a.loop, a.compiled): a.images_per_s for a in arms if not a.error}
    lines = ["| model | input | batch | torch.compile | loop | train img/s | engine / bare | compiled / eager "
             "| first step s | peak GPU memory GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        bare = rate.get((a.model_name, "bare", a.compiled))
        eager = rate.get((a.model_name, a.loop, False))
        vs_bare = f"{a.images_per_s / bare:.3f}" if a.loop == "engine" and bare and not a.error else ""
        vs_eager = f"{a.images_per_s / eager:.2f}" if a.compiled and eager and not a.error else ""
        mem = f"{a.peak_bytes / 2**30:.2f}" if a.peak_bytes else "n/a (CPU)"
        speed = f"failed ({a.error})" if a.error else f"{a.images_per_s:,.1f}"
        lines.append(f"| {a.model_name} | 3x{a.size}x{a.size} | {a.batch} | {'yes' if a.compiled else 'no'} | "
                     f"{a.loop} | {speed} | {vs_bare} | {vs_eager} | {a.first_step_s:.1f} | {mem} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5, help="steps after the first (compiling) one")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch")
    p.add_argument("--compile", nargs="+", type=lambda s: s == "on", default=[False, True], metavar="off|on",
                   help="the torch.compile settings to run (default: off on)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --tiny: eager)")
    p.add_argument("--log-interval", type=int, default=50, help="bare loop: loss.item() every this many steps")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine's progress bar (on, as in fit)")
    p.add_argument("--tiny", action="store_true",
                   help="small models and inputs, 2 rounds of 1 step, 1 thread, compile backend eager: a CPU check")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--tiny: 1)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.rounds, args.warmup = 1, 2, 0
        args.progress = False
    args.backend = args.backend or ("eager" if args.tiny else "inductor")
    args.threads = args.threads or (1 if args.tiny else None)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available() and not args.tiny and not args.cpu:
        print("no CUDA device: this benchmark needs a GPU (or --tiny / --cpu for a CPU check)", file=sys.stderr)
        return 1
    arms = benchmark(args)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "CPU"
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {dev}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; bf16 autocast, "
          f"channels_last, compile backend {args.backend}; {args.rounds} rounds of {args.steps} steps in turns "
          "(median)\n")
    print(table(arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

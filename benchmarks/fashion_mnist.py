"""Small VGG on the real Fashion-MNIST: test accuracy against training time, one arm or several in one run.

    .venv/bin/python benchmarks/fashion_mnist.py [--epochs 12] [--set key=value ...]      # one arm
    .venv/bin/python benchmarks/fashion_mnist.py --threads 1 \\
        --arm base12 train.epochs=12 --arm bf16_18 train.amp=bf16 train.epochs=18         # arms in parallel

Trains ``configs/fashion_mnist_vgg.yaml`` (``best`` chosen on the 10% held-out split) and after every
epoch evaluates the official test split, one view and with the VGG paper's test-time flip (METHODS.md §1:
the image and its mirror, softmax averaged). The test evaluation is not counted as training time: the
curve's minutes are the run's wall clock (training, validation, checkpoints) and its CPU minutes
(``time.process_time``: the compute spent, whatever else runs on the machine), both without the test
passes. Prints the curve and the minutes to reach 93.0 % and 93.5 % (flip).

With ``--arm NAME KEY=VALUE ...`` (repeatable) every arm runs as its own process, all at the same time
(``--parallel``, default all), so arms share the machine's load; ``--threads 1`` gives each one core. The
first arm is the reference: the summary says which arms reach 93.5 % (flip) within its total training
time, in CPU minutes and in wall minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from coarse2fine.config import RunConfig, load_config
from coarse2fine.engine import Callback, FitSetup, RunFolder, default_callbacks, fit
from coarse2fine.engine.evaluate import resolve_device
from coarse2fine.recipes import build_datasets
from coarse2fine.recipes.data import build_loaders
from coarse2fine.recipes.models import build_model_and_objective
from coarse2fine.recipes.train import save_resolved_config

TARGETS = (93.0, 93.5)


def machine() -> str:
    dev = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    cpu = platform.processor() or platform.machine()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}; load average {load}"


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, loader: Any, device: torch.device) -> tuple[float, float]:
    """Top-1 (%) on ``loader``: one view, and the softmax average of the image and its horizontal mirror."""
    model.eval()
    correct = correct_flip = seen = 0
    for x, y in loader:
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        p = model(x).float().softmax(1)
        p_flip = p + model(x.flip(3)).float().softmax(1)
        correct += int((p.argmax(1) == y).sum())
        correct_flip += int((p_flip.argmax(1) == y).sum())
        seen += y.numel()
    return 100 * correct / seen, 100 * correct_flip / seen


class TestCurve(Callback):
    """After every epoch: the test accuracy and the training time so far (the test passes not counted)."""

    def __init__(self, model: torch.nn.Module, loader: Any, device: torch.device) -> None:
        self.model, self.loader, self.device = model, loader, device
        self.rows: list[dict[str, float]] = []
        self.wall0 = self.cpu0 = self.eval_wall = self.eval_cpu = 0.0

    def on_fit_start(self, state: Any) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch: int, record: Any) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        one, flip = test_accuracy(self.model, self.loader, self.device)
        self.rows.append({
            "epoch": epoch,
            "minutes": (wall - self.wall0 - self.eval_wall) / 60,
            "cpu_minutes": (cpu - self.cpu0 - self.eval_cpu) / 60,
            "train_top1": 100 * float(record["train_top1"]),
            "val_top1": 100 * float(record["val_top1"]),
            "test_top1": one,
            "test_flip": flip,
        })
        self.eval_wall += time.perf_counter() - wall
        self.eval_cpu += time.process_time() - cpu


def run_arm(cfg: RunConfig) -> list[dict[str, float]]:
    """Train ``cfg`` with the default callbacks plus the test curve; its rows."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bundle = build_datasets(cfg)
    loaders = build_loaders(cfg, bundle)
    facts = bundle.facts()
    model, objective = build_model_and_objective(cfg, facts)
    run = RunFolder(cfg.run_dir, overwrite=True)
    save_resolved_config(cfg, cfg.run_dir)
    curve = TestCurve(model, loaders.test, resolve_device(cfg.train.device))
    setup = FitSetup.from_run_config(cfg, bundle.classes, facts.to_dict(), progress=sys.stderr.isatty())
    fit(model, objective, loaders.train, loaders.val, setup, run, [*default_callbacks(run), curve])
    return curve.rows


def first_reaching(rows: list[dict[str, float]], target: float, key: str = "test_flip") -> dict[str, float] | None:
    return next((r for r in rows if r[key] >= target), None)


def print_curve(name: str, cfg: dict[str, Any], rows: list[dict[str, float]]) -> None:
    t = cfg["train"]
    print(f"\n### {name}: model={cfg['model']['name']} epochs={t['epochs']} batch={cfg['data']['batch_size']} "
          f"lr={cfg['optim']['lr']} amp={t['amp']} threads={t['threads']}\n")
    print("| epoch | wall minutes | CPU minutes | train top-1 | val top-1 | test top-1 | test top-1, flip |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['epoch']} | {r['minutes']:.1f} | {r['cpu_minutes']:.1f} | {r['train_top1']:.2f} | "
              f"{r['val_top1']:.2f} | {r['test_top1']:.2f} | {r['test_flip']:.2f} |")
    best = max(rows, key=lambda r: r["val_top1"])
    print(f"\nbest epoch {best['epoch']} (validation): test {best['test_top1']:.2f} %, flip {best['test_flip']:.2f} %")
    for target in TARGETS:
        hit = first_reaching(rows, target)
        when = f"epoch {hit['epoch']}, {hit['minutes']:.1f} wall / {hit['cpu_minutes']:.1f} CPU min" if hit else "not"
        print(f"reaches {target} % (flip): {when}")


def summary(arms: list[tuple[str, dict[str, Any], list[dict[str, float]]]]) -> None:
    ref_name, _, ref = arms[0]
    budget_cpu, budget_wall = ref[-1]["cpu_minutes"], ref[-1]["minutes"]
    print(f"\n## Summary: budget = {ref_name}'s training time, {budget_cpu:.1f} CPU min / {budget_wall:.1f} wall min\n")
    print("| arm | epochs | CPU min total | wall min total | final test / flip | best-val epoch test / flip "
          "| 93.0 % flip at (CPU min) | 93.5 % flip at (CPU min) | 93.5 % flip within budget |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, rows in arms:
        last, best = rows[-1], max(rows, key=lambda r: r["val_top1"])
        hits = [first_reaching(rows, t) for t in TARGETS]
        at = [f"{h['cpu_minutes']:.1f} (epoch {h['epoch']})" if h else "-" for h in hits]
        ok = hits[1] is not None and hits[1]["cpu_minutes"] <= budget_cpu
        print(f"| {name} | {last['epoch']} | {last['cpu_minutes']:.1f} | {last['minutes']:.1f} | "
              f"{last['test_top1']:.2f} / {last['test_flip']:.2f} | "
              f"{best['test_top1']:.2f} / {best['test_flip']:.2f} | {at[0]} | {at[1]} | {'yes' if ok else 'no'} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fashion_mnist_vgg.yaml")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="for every arm")
    p.add_argument("--arm", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="an arm: its name and its overrides (repeat for more arms; the first is the reference)")
    p.add_argument("--threads", type=int, default=None, help="train.threads of every arm")
    p.add_argument("--parallel", type=int, default=None, help="arms running at once (default: all)")
    p.add_argument("--name", default="bench_fmnist")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # a child process writes its rows here
    return p.parse_args(argv)


def arm_config(args: argparse.Namespace, name: str, extra: list[str]) -> RunConfig:
    overrides = [f"name={name}", *args.overrides, *extra]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.threads is not None:
        overrides.append(f"train.threads={args.threads}")
    return load_config(args.config, overrides)


def run_parallel(args: argparse.Namespace, tmp: Path) -> list[tuple[str, dict[str, Any], list[dict[str, float]]]]:
    """Each arm in its own process (``--parallel`` at a time); their rows, in the order given."""
    pending = list(args.arm)
    running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    done: dict[str, list[dict[str, float]]] = {}
    limit = args.parallel or len(pending)
    base = [sys.executable, __file__, "--config", args.config]
    base += [x for o in args.overrides for x in ("--set", o)]
    base += ["--threads", str(args.threads)] if args.threads else []
    while pending or running:
        while pending and len(running) < limit:
            name, *extra = pending.pop(0)
            out = tmp / f"{name}.json"
            cmd = [*base, "--name", name, "--json", str(out), *[x for o in extra for x in ("--set", o)]]
            running.append((name, subprocess.Popen(cmd), out))
        for item in list(running):
            name, proc, out = item
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"arm {name} failed (exit {proc.returncode})")
                done[name] = json.loads(out.read_text())
                running.remove(item)
        time.sleep(2)
    return [(a[0], _config_dict(args, a[0], a[1:]), done[a[0]]) for a in args.arm]


def _config_dict(args: argparse.Namespace, name: str, extra: list[str]) -> dict[str, Any]:
    cfg = arm_config(args, name, extra)
    return {"model": {"name": cfg.model.name}, "data": {"batch_size": cfg.data.batch_size},
            "optim": {"lr": cfg.optim.lr}, "train": {"epochs": cfg.train.epochs, "amp": cfg.train.amp,
                                                     "threads": cfg.train.threads}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json is not None or not args.arm:
        cfg = arm_config(args, args.name, [])
        rows = run_arm(cfg)
        if args.json is not None:
            Path(args.json).write_text(json.dumps(rows))
            return 0
        arms = [(args.name, _config_dict(args, args.name, []), rows)]
    else:
        print(f"machine at the start: {machine()}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            arms = run_parallel(args, Path(tmp))
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine at the end: {machine()}")
    for name, cfg, rows in arms:
        print_curve(name, cfg, rows)
    summary(arms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

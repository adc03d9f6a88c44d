"""HD-CNN ablation on Fashion-MNIST (METHODS.md §2.4's table, same building block, stated epoch budget).

Rows: building block; average of two building blocks (softmax mean, second seed); HD-CNN without
fine-tuning; fine-tuned without and with the consistency term; conditional execution at several
beta; product-quantised compression. Plus: all K fine components batched with ``torch.vmap`` vs a
Python loop over them (inference and one training step).

    python benchmarks/hdcnn.py                      # short version (limit_train, 1-2 epochs per stage)
    python benchmarks/hdcnn.py --full               # the recipe's data and epoch budget
    python benchmarks/hdcnn.py --set hdcnn.num_coarse=3 --out runs/bench
    python benchmarks/hdcnn.py --compress-sweep runs/demo_hdcnn/hdcnn.pt   # PQ settings on a trained HD-CNN

Stages are cached under ``<out>/<name>/`` like ``c2f hdcnn fit``: a second run re-evaluates only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coarse2fine.compress import model_bytes
from coarse2fine.config import load_config
from coarse2fine.data import class_counts
from coarse2fine.engine.evaluate import autocast, autocast_dtype, evaluate, resolve_device
from coarse2fine.engine.protocols import Fusion
from coarse2fine.hdcnn import HDCNN, HDCNNObjective, compress_hdcnn, inference_pass, peak_memory_bytes
from coarse2fine.hierarchy import COARSE_TARGET_RULES, coarse_targets
from coarse2fine.recipes import build_datasets, build_loaders, eval_loader, load_trained
from coarse2fine.recipes.hdcnn import StagePaths, pretrain_stages, stage_block, stage_finetune

SHORT = [
    "data.limit_train=3000",
    "data.limit_test=1000",
    "hdcnn.block_epochs=2",
    "hdcnn.fine_epochs=1",
    "hdcnn.finetune_epochs=1",
]


# coarse + fine components, each layer quantised along its longer side (W^T for fc1 and the 3x3 convs)
REAR_PQ: dict[str, Any] = {"axis": "auto", "linear": (4, 64), "conv": (2, 128)}
# compressions of the fine-tuned HD-CNN: (spec, auto_spec keywords, label)
COMPRESSIONS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fc": ("fc", {}, "fully connected layers"),
    "auto": ("auto", {}, "auto spec: conv + fc"),
    "rear_columns": ("rear", REAR_PQ, "rear layers, longer side: fc s=4 k=64, conv s=2 k=128"),
}

TIMER = time.perf_counter  # --clock cpu: time.thread_time with one torch thread (immune to other jobs)


def _now(device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return TIMER()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _row(name: str, model: nn.Module, loader: Any, device: torch.device, beta: float | None = None) -> dict:
    res = inference_pass(model, loader, device=device, beta=beta)
    return {
        "variant": name,
        "top1": res.top1,
        "top5": res.top5,
        "components": res.components_run,
        "ms_per_image": res.ms_per_image,
        "params": _params(model),
        "bytes": model_bytes(model),
        "_run": (model, {"beta": beta} if isinstance(model, HDCNN) else {}),
    }


@torch.inference_mode()
def _round_robin_ms(rows: list[dict], images: Tensor, repeats: int) -> None:
    """ms / image of every row's model on one batch, the rows taking turns, best of ``repeats``."""
    best = [float("inf")] * len(rows)
    for _ in range(repeats):
        for i, row in enumerate(rows):
            model, kwargs = row["_run"]
            model.eval()
            start = TIMER()
            model(images, **kwargs)
            best[i] = min(best[i], TIMER() - start)
    for row, seconds in zip(rows, best):
        row["ms_per_image_best"] = 1000 * seconds / images.shape[0]


def _exec_timing(
    model: HDCNN, images: Tensor, targets: Tensor, t: Any, repeats: int, amp: str = "off"
) -> dict[str, dict]:
    """vmap vs loop over the K fine components on one batch: the modes alternate, best of ``repeats``.

    Training steps run on a copy (they update batch-norm statistics); inference runs all components.
    """
    device = images.device
    dtype = autocast_dtype(amp, device)
    objective = HDCNNObjective(t).to(device)
    scratch = copy.deepcopy(model)
    best = {mode: {"infer": float("inf"), "train": float("inf")} for mode in ("vmap", "loop")}
    outputs = {}
    for _ in range(repeats + 1):  # the first round warms up (not counted)
        for mode in ("vmap", "loop"):
            model.fine.set_exec(mode)
            scratch.fine.set_exec(mode)
            model.eval()
            with torch.inference_mode(), autocast(device, dtype):
                start = _now(device)
                outputs[mode] = model(images, beta=None)["probs"].float()
                infer = _now(device) - start
            scratch.train()
            start = _now(device)
            with autocast(device, dtype):
                loss = objective(scratch(images), targets)["loss"]
            loss.backward()
            train = _now(device) - start
            scratch.zero_grad(set_to_none=True)
            if _ > 0:
                best[mode]["infer"] = min(best[mode]["infer"], infer)
                best[mode]["train"] = min(best[mode]["train"], train)
    n = images.shape[0]
    diff = float((outputs["vmap"] - outputs["loop"]).abs().max())
    return {
        mode: {"infer_ms_per_image": 1000 * v["infer"] / n, "train_step_ms": 1000 * v["train"], "max_prob_diff": diff}
        for mode, v in best.items()
    }


SYNTHETIC = {"fashion_mnist": (10, 1, 28), "cifar100": (100, 3, 32)}  # classes, channels, size


def exec_only(cfg: Any, batch: int, repeats: int) -> None:
    """vmap vs loop on random images with an untrained HD-CNN of the recipe (no data, no training)."""
    from coarse2fine.recipes import build_backbone

    device = resolve_device(cfg.train.device)
    c, chans, size = SYNTHETIC.get(cfg.data.name, (10, 3, 32))
    k = cfg.hdcnn.num_coarse
    sets = [sorted({*range(i, c, k), (i + 1) % c}) for i in range(k)]  # K overlapping partial sets
    torch.manual_seed(cfg.seed)
    block = build_backbone(dataclasses.replace(cfg, method="plain"), c, chans, load_files=False)
    model = HDCNN(block, sets, cfg.hdcnn.branch_stage).to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, chans, size, size, device=device)
    targets = torch.randint(0, c, (batch,), device=device)
    t = [len(s) / sum(map(len, sets)) for s in sets]
    res = _exec_timing(model, images, targets, t, repeats, amp=cfg.train.amp)
    print(
        f"\nsynthetic HD-CNN: {cfg.model.name}, K={k}, branch at {cfg.hdcnn.branch_stage}, batch {batch}, "
        f"device {device}, amp {cfg.train.amp}, best of {repeats}"
    )
    print("| all K fine components run as | inference ms / image | training step ms |\n|---|---:|---:|")
    for mode, r in res.items():
        print(f"| {mode} | {r['infer_ms_per_image']:.4f} | {r['train_step_ms']:.2f} |")
    print(f"(largest probability difference between the two: {res['vmap']['max_prob_diff']:.1e})")


# settings compared by --compress-sweep: label -> (spec, auto_spec keywords); "C" = axis columns (W^T)
_C = "columns"
SWEEP: dict[str, tuple[str | dict[str, Any], dict[str, Any]]] = {
    "fully connected layers, row orientation (s=4, k<=m/4)": ("fc", {}),
    "auto, row orientation (fc s=4 k<=m/4, conv s=3 k<=2m/3)": ("auto", {}),
    "auto, longer side (same s, k)": ("auto", {"axis": "auto"}),
    "rear preset (longer side, fc s=4 k=64, conv s=2 k=128)": ("rear", REAR_PQ),
    "rear, longer side, fc s=8 k=64, conv s=3 k=128": ("rear", {"axis": "auto", "linear": (8, 64), "conv": (3, 128)}),
    "rear, longer side, fc s=4 k=32, conv s=3 k=128": ("rear", {"axis": "auto", "linear": (4, 32), "conv": (3, 128)}),
    "rear, longer side, fc s=4 k=64, conv s=4 k=64": ("rear", {"axis": "auto", "linear": (4, 64), "conv": (4, 64)}),
}


def compress_sweep(checkpoint: str, seed: int) -> None:
    """Test top-1 and sizes of a trained HD-CNN under each SWEEP setting (no training; k-means only)."""
    trained = load_trained(checkpoint)
    cfg, model = trained.cfg, trained.model
    bundle = build_datasets(cfg)
    loader = eval_loader(cfg, bundle.test, trained.eval_transform())
    base = evaluate(model, loader, num_classes=len(trained.classes)).top1
    print(f"command: {' '.join(sys.argv)}\n{checkpoint}: K={model.num_coarse}, test top-1 {100 * base:.2f} %\n")
    print("| setting | test top-1 % | points lost | rear layers smaller | model smaller |")
    print("|---|---:|---:|---:|---:|")
    for label, (spec, auto) in SWEEP.items():
        compressed = copy.deepcopy(model)
        report = compress_hdcnn(compressed, spec, seed=seed, **auto)
        top1 = evaluate(compressed, loader, num_classes=len(trained.classes)).top1
        print(
            f"| {label} | {100 * top1:.2f} | {100 * (base - top1):.2f} | {report['rear_factor']:.2f}x | "
            f"{report['factor']:.2f}x |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/hdcnn_fashion_mnist.yaml")
    ap.add_argument("--full", action="store_true", help="the recipe's full data and epochs (long)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/bench_hdcnn")
    ap.add_argument("--betas", default="1,1.5,2,4", help="comma-separated beta values")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: one torch thread, the timed rows measured by the thread's CPU time (for shared machines)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="vmap vs loop timing: best of this many")
    ap.add_argument(
        "--exec-only",
        type=int,
        default=None,
        metavar="BATCH",
        help="only time vmap vs loop on random images of this batch size (untrained model; e.g. on a GPU)",
    )
    ap.add_argument(
        "--compress-sweep",
        default=None,
        metavar="CHECKPOINT",
        help="only compare product-quantisation settings on a trained HD-CNN checkpoint (test top-1, sizes)",
    )
    args = ap.parse_args()
    global TIMER
    if args.clock == "cpu":
        TIMER = time.thread_time
        torch.set_num_threads(1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    overrides = ([] if args.full else SHORT) + args.overrides
    name = "full" if args.full else "short"
    cfg = load_config(args.config, [*overrides, f"out_dir={args.out}", f"name={name}"])
    if args.exec_only:
        exec_only(cfg, args.exec_only, args.repeats)
        return
    if args.compress_sweep:
        compress_sweep(args.compress_sweep, cfg.seed)
        return
    device = resolve_device(cfg.train.device)
    paths = StagePaths(cfg.run_dir)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    bundle = build_datasets(cfg)
    loaders = build_loaders(cfg, bundle)
    classes = list(bundle.classes)
    pre = pretrain_stages(cfg, bundle, loaders, paths, resume=True, progress=True)
    block, h, t, facts, initial = pre.block, pre.hierarchy, pre.coarse_targets, pre.facts, pre.model
    cfg2 = dataclasses.replace(cfg, seed=cfg.seed + 1, hdcnn=dataclasses.replace(cfg.hdcnn, block_checkpoint=None))
    block2, _ = stage_block(
        cfg2, bundle, loaders, StagePaths(paths.run_dir / "second_block"), resume=True, progress=True
    )
    lam = cfg.hdcnn.consistency_weight
    counts = class_counts(bundle.train, len(classes))
    other_rule = next(r for r in COARSE_TARGET_RULES if r != cfg.hdcnn.coarse_targets)
    finetunings = {  # row key -> (lambda, t_k, stage folder)
        "lambda=0": (0.0, t, "lambda_0"),
        f"lambda={lam:g}": (lam, t, f"lambda_{lam:g}"),
        f"lambda={lam:g}, t_k: {other_rule}": (
            lam,
            coarse_targets(h.partial_sets, counts, other_rule),
            f"lambda_{lam:g}_{other_rule}",
        ),
    }
    tuned = {}
    for key, (weight, targets, folder) in finetunings.items():
        model = copy.deepcopy(initial)
        lcfg = dataclasses.replace(cfg, hdcnn=dataclasses.replace(cfg.hdcnn, consistency_weight=weight))
        stage_finetune(
            lcfg,
            model,
            bundle,
            loaders,
            StagePaths(paths.run_dir / folder),
            facts,
            targets,
            resume=True,
            progress=True,
        )
        tuned[key] = model
    train_seconds = time.perf_counter() - t0

    test = loaders.test
    best = tuned[f"lambda={lam:g}"]
    rows = [
        _row("building block", block.to(device), test, device),
        _row("average of two building blocks", Fusion(block, block2).to(device), test, device),
        _row("HD-CNN, no fine-tuning", initial.to(device), test, device),
        *(_row(f"HD-CNN, fine-tuned, {key}", model.to(device), test, device) for key, model in tuned.items()),
    ]
    betas = [float(b) for b in args.betas.split(",") if b]
    for beta in betas:
        rows.append(_row(f"  + conditional execution, beta={beta:g}", best, test, device, beta=beta))
    compression = {}
    for key, (spec, auto, label) in COMPRESSIONS.items():
        compressed = copy.deepcopy(best)
        compression[key] = compress_hdcnn(compressed, spec, seed=cfg.seed, **auto)
        rows.append(_row(f"  + compression (PQ, {label})", compressed, test, device))
        rows[-1]["bytes"] = compression[key]["bytes_after"]
        rows[-1]["rear_factor"] = compression[key]["rear_factor"]

    # vmap vs loop over the K fine components (same model, same weights)
    images, targets = next(iter(loaders.train))
    images, targets = images.to(device), targets.to(device)
    exec_times = _exec_timing(best, images, targets, t, repeats=args.repeats, amp=cfg.train.amp)
    best.fine.set_exec(cfg.hdcnn.fine_exec)
    best.eval()
    eval_images = next(iter(test))[0].to(device)
    _round_robin_ms(rows, eval_images, args.repeats)
    memory = {
        "block_peak_bytes": peak_memory_bytes(block, eval_images),
        "hdcnn_peak_bytes": peak_memory_bytes(best, eval_images, beta=None),
        "hdcnn_conditional_peak_bytes": peak_memory_bytes(best, eval_images, beta=min(betas)),
        "batch": int(eval_images.shape[0]),
    }
    check = evaluate(best, test, num_classes=len(classes), device=device)

    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {args.clock} clock"
    )
    print(
        f"\nHD-CNN on Fashion-MNIST ({name}: {' '.join(overrides) or 'recipe as is'}), K={h.num_coarse}, "
        f"block {cfg.model.name}, branch at {cfg.hdcnn.branch_stage}; device {device}; {machine}"
    )
    print(f"groups: {h.partial_groups()}\n")
    print(
        "| variant | top-1 % | top-5 % | fine components / image | ms / image (test pass) | "
        f"ms / image (batch {eval_images.shape[0]}, best of {args.repeats}) | parameters | bytes | "
        "rear layers smaller |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        comps = "-" if r["components"] is None else f"{r['components']:.2f}"
        size = f"{r['bytes']:,}"
        rear = f"{r['rear_factor']:.2f}x" if "rear_factor" in r else "-"
        print(
            f"| {r['variant']} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} | {comps} | "
            f"{r['ms_per_image']:.3f} | {r['ms_per_image_best']:.3f} | {r['params']:,} | {size} | {rear} |"
        )
    print(
        f"\n| all K fine components run as (batch {images.shape[0]}, best of {args.repeats}) | inference ms / image "
        "| training step ms |"
    )
    print("|---|---:|---:|")
    for mode, r in exec_times.items():
        print(f"| {mode} | {r['infer_ms_per_image']:.3f} | {r['train_step_ms']:.1f} |")
    print(f"(largest probability difference between the two: {exec_times['vmap']['max_prob_diff']:.1e})")
    print(
        f"\npeak memory of one forward pass (batch {memory['batch']}): "
        f"block {memory['block_peak_bytes']:,} B, "
        f"HD-CNN {memory['hdcnn_peak_bytes']:,} B "
        f"(beta={min(betas):g}: {memory['hdcnn_conditional_peak_bytes']:,} B); "
        f"engine.evaluate top-1 {100 * check.top1:.2f} %; "
        f"training stages took {train_seconds:.0f} s (cached stages count 0)"
    )
    out = Path(paths.run_dir) / "benchmark.json"
    out.write_text(
        json.dumps(
            {
                "rows": [{k: v for k, v in r.items() if k != "_run"} for r in rows],
                "exec": exec_times,
                "memory": memory,
                "compression": compression,
                "overrides": overrides,
                "machine": machine,
            },
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()

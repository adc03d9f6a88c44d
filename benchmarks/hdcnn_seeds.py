"""HD-CNN against its building block over seeds (issue 16's table): one seed per run, JSON rows for
``benchmarks/seeds.py``.

Rows of one seed: the building block; the average of two building blocks (softmax mean; the second
block trained with seed + 100), the paper's strong baseline; HD-CNN on the hierarchy of each
``--clusterings`` method (``spectral``: the paper's and the old default; ``auto``: METHODS.md §2.1's
rule, the default now), all fine-tuned with the recipe's consistency weight. The HD-CNNs of a seed
share its building block (``hdcnn.block_checkpoint``); every stage of a seed is cached under
``<out>/seed<N>/`` and a second run only evaluates. Test top-1 is on the recipe's test split (a
folder tree's carved stratified part, Fashion-MNIST's official 10k); the hierarchy is learnt on the
held-out validation split.

    python benchmarks/hdcnn_seeds.py --seed 0 --json runs/hd_s0.json --set hdcnn.block_epochs=8
    python benchmarks/hdcnn_seeds.py --config configs/hdcnn_fashion_mnist.yaml --seed 1 \\
        --set data.name=folder --set data.root=~/data/cifar10-jpeg/train --set hdcnn.num_coarse=3
    python benchmarks/hdcnn_seeds.py --table runs/hd_s*.json      # the tables over the seeds' JSON files
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coarse2fine.config import RunConfig, load_config
from coarse2fine.engine.evaluate import apply_threads, evaluate, predict_proba
from coarse2fine.engine.protocols import Fusion
from coarse2fine.hierarchy import cluster_partition, confusion_matrix, distance_matrix
from coarse2fine.recipes import build_datasets, build_loaders
from coarse2fine.recipes.hdcnn import StagePaths, pretrain_stages, stage_block, stage_finetune
from seeds import seed_table, spread  # benchmarks/seeds.py

METHODS = ("spectral", "agglomerative", "affinity", "auto")  # METHODS.md §2.1's clustering methods


def hierarchy_methods(cfg: RunConfig, block: nn.Module, loaders: Any, classes: list[str]) -> dict[str, Any]:
    """Every clustering method's partition of the block's held-out confusion at the recipe's K: groups,
    confusion kept inside groups (11a) and normalised cut (11b), all on the same matrix."""
    probs, targets = predict_proba(block, loaders.val, device=cfg.train.device, amp=cfg.train.amp)
    D = distance_matrix(confusion_matrix(probs, targets, len(classes)))
    out = {}
    for method in METHODS:
        labels, info = cluster_partition(D, cfg.hdcnn.num_coarse, method=method, seed=cfg.seed)
        groups = [[classes[j] for j in range(len(classes)) if labels[j] == k] for k in sorted(set(labels.tolist()))]
        out[method] = {"groups": groups, **{k: info["quality"][k] for k in ("confusion_kept", "ncut")}}
    return out


def _hdcnn(cfg: RunConfig, clustering: str, block_path: str, bundle: Any, loaders: Any, folder: Path) -> dict:
    """Stages 2-4 on the seed's block with ``clustering`` under ``folder``: the fine-tuned model, its hierarchy."""
    hd = dataclasses.replace(cfg.hdcnn, clustering=clustering, block_checkpoint=block_path)
    ccfg = dataclasses.replace(cfg, hdcnn=hd)
    paths = StagePaths(folder)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    pre = pretrain_stages(ccfg, bundle, loaders, paths, resume=True, progress=True)
    model = pre.model
    stage_finetune(ccfg, model, bundle, loaders, paths, pre.facts, pre.coarse_targets, resume=True, progress=True)
    return {"model": model, "hierarchy": pre.hierarchy}


def run_seed(cfg: RunConfig, clusterings: list[str], tag: str = "") -> dict[str, Any]:
    """Train (or reuse) every stage of one seed and evaluate every row on the test split; a ``tag`` names
    HD-CNNs trained with other settings (``--set``) beside the untagged ones, on the same blocks."""
    start = time.perf_counter()
    seed_dir = Path(cfg.run_dir)
    bundle = build_datasets(cfg, run_dir=seed_dir)
    loaders = build_loaders(cfg, bundle)
    block, block_path = stage_block(cfg, bundle, loaders, StagePaths(seed_dir / "block"), resume=True, progress=True)
    cfg2 = dataclasses.replace(cfg, seed=cfg.seed + 100)
    block2, _ = stage_block(cfg2, bundle, loaders, StagePaths(seed_dir / "second_block"), resume=True, progress=True)
    models: dict[str, nn.Module] = {"building block": block, "average of two building blocks": Fusion(block, block2)}
    groups: dict[str, Any] = {}
    methods = hierarchy_methods(cfg, block, loaders, list(bundle.classes))
    for c in clusterings:
        got = _hdcnn(cfg, c, block_path, bundle, loaders, seed_dir / (f"{c}_{tag}" if tag else c))
        models[f"HD-CNN, {c} hierarchy" + (f", {tag}" if tag else "")] = got["model"]
        h = got["hierarchy"]
        groups[c] = {"partial_sets": h.partial_groups(), "quality": h.meta.get("quality", {})}
    train_seconds = time.perf_counter() - start
    rows = []
    for name, model in models.items():
        res = evaluate(model, loaders.test, num_classes=len(bundle.classes), device=cfg.train.device,
                       amp=cfg.train.amp, channels_last=cfg.train.channels_last)
        rows.append({"variant": name, "top1": res.top1, "top5": res.top5})
        print(f"seed {cfg.seed}: {name}: {100 * res.top1:.2f} %", flush=True)
    return {
        "rows": rows,
        "groups": groups,
        "hierarchy_methods": methods,
        "train_seconds": train_seconds,
        "test_images": len(bundle.test),
    }


def tables(files: list[str]) -> str:
    """Test top-1 over the seeds (paired against the block), then each clustering method's confusion kept
    inside groups (11a) and normalised cut (11b) on the same blocks' held-out confusion."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    out = [seed_table(runs, key="variant", value="top1", base="building block", label="test top-1")]
    out += [
        "",
        "| clustering (K from the recipe) | confusion kept inside groups % | normalised cut | groups (first seed) |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        got = [r["hierarchy_methods"][method] for r in runs if method in r.get("hierarchy_methods", {})]
        if got:
            groups = " ".join("{" + ", ".join(g) + "}" for g in got[0]["groups"])
            kept = spread([g["confusion_kept"] for g in got], digits=1)
            ncut = spread([g["ncut"] for g in got], scale=1.0, digits=3)
            out.append(f"| {method} | {kept} | {ncut} | {groups} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/hdcnn_fashion_mnist.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clusterings", default="spectral,auto")
    ap.add_argument("--tag", default="", help="name HD-CNNs trained with other --set values (own stage folders)")
    ap.add_argument("--out", default="runs/bench_hdcnn_seeds")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON", help="only print the tables of these runs")
    args = ap.parse_args(argv)
    if args.table:
        print(tables(args.table))
        return 0
    overrides = [*args.overrides, f"seed={args.seed}", f"out_dir={args.out}", f"name=seed{args.seed}"]
    cfg = load_config(args.config, overrides)
    apply_threads(cfg.train.threads)
    result = run_seed(cfg, [c for c in args.clusterings.split(",") if c], args.tag)
    result.update(
        config=args.config,
        overrides=overrides,
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
    )
    for c, g in result["groups"].items():
        q = g["quality"]
        print(f"{c}: {g['partial_sets']}; confusion kept inside groups {q.get('confusion_kept', float('nan')):.3f}")
    for m, q in result["hierarchy_methods"].items():
        print(f"  {m}: kept {q['confusion_kept']:.3f}, ncut {q['ncut']:.3f}: {q['groups']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

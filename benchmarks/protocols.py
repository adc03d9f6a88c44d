"""VGG test protocols and ConvNet fusion on the real Fashion-MNIST test split (issue 3).

    .venv/bin/python benchmarks/protocols.py --checkpoint A.pt --checkpoint B.pt [--limit-test N]

For the first checkpoint: test accuracy and time per image for ``center``, ``dense``, ``multicrop``,
``multiscale`` and ``dense+multicrop``; then the fusion of all given checkpoints (softmax averaged) with
``center`` and with ``dense``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from coarse2fine.config import with_overrides
from coarse2fine.recipes import build_datasets, evaluate_protocol_on, load_trained


def run(models: list, cfg, dataset, protocol: str, stats: dict, classes: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    result, views = evaluate_protocol_on(models, cfg, dataset, protocol, stats, classes)
    seconds = time.perf_counter() - start
    return result.top1, 1000 * seconds / max(1, result.num_samples), views


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", required=True)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_grad_enabled(False)
    trained = [load_trained(c) for c in args.checkpoint]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for t in trained:
        t.model.to(device)
    first = trained[0]
    overrides = list(args.overrides)
    if args.limit_test:
        overrides.append(f"data.limit_test={args.limit_test}")
    cfg = with_overrides(first.cfg, overrides)
    bundle = build_datasets(cfg)
    stats, c = first.facts.data_stats, len(first.classes)
    rows = []
    for protocol in ("center", "dense", "multicrop", "multiscale", "dense+multicrop"):
        rows.append((f"{first.cfg.model.name} {protocol}", *run([first.model], cfg, bundle.test, protocol, stats, c)))
    if len(trained) > 1:
        names = " + ".join(t.cfg.model.name for t in trained)
        for protocol in ("center", "dense"):
            models = [t.model for t in trained]
            rows.append((f"fusion ({names}) {protocol}", *run(models, cfg, bundle.test, protocol, stats, c)))
    print(f"command: {' '.join(sys.argv)}")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"machine: {where}, torch {torch.__version__}")
    print(f"test images: {len(bundle.test)}\n")
    print("| model / protocol | views per image | test top-1 % | test error % | ms per image |")
    print("|---|---|---|---|---|")
    for name, top1, ms, views in rows:
        print(f"| {name} | {views} | {100 * top1:.2f} | {100 * (1 - top1):.2f} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

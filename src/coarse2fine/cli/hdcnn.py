"""``c2f hdcnn fit`` (staged training + test report) and ``c2f hdcnn eval`` (a checkpoint, beta sweep)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coarse2fine.cli.common import add_quiet, add_set, pct
from coarse2fine.config import load_config
from coarse2fine.engine.checkpoint import atomic_write_json, check_classes
from coarse2fine.errors import CheckpointError
from coarse2fine.hdcnn import HDCNN
from coarse2fine.hierarchy import Hierarchy
from coarse2fine.recipes import build_datasets, build_loaders, load_trained
from coarse2fine.recipes.hdcnn import run_pipeline
from coarse2fine.recipes.hdcnn_report import evaluate_hdcnn, reference_taxonomy


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "hdcnn",
        help="HD-CNN: hierarchical network from a learnt category hierarchy",
        description="HD-CNN (Yan et al. 2015): building block, hierarchy, fine components, fine-tuning.",
    )
    sub = p.add_subparsers(dest="hdcnn_command", metavar="{fit,eval}")
    sub.required = True

    fit = sub.add_parser(
        "fit",
        help="train every stage (resumable; finished stages are skipped) and evaluate on the test split",
        description="Stages under <out_dir>/<name>/: block.pt, hierarchy.json/png, fine/component_<k>.pt, "
        "hdcnn_init.pt, hdcnn.pt; then hdcnn_report.json and beta_tradeoff.png. Re-running the same "
        "command resumes an interrupted stage and skips finished ones.",
    )
    fit.add_argument("--config", required=True, help="a recipe, e.g. configs/hdcnn_fashion_mnist.yaml")
    add_set(fit, "a recipe value, e.g. --set hdcnn.num_coarse=3")
    fit.add_argument(
        "--restart",
        action="store_true",
        help="retrain every stage from scratch instead of reusing finished stages",
    )
    add_quiet(fit)
    fit.set_defaults(func=run_fit)

    ev = sub.add_parser(
        "eval",
        help="evaluate an HD-CNN checkpoint on the test split (accuracy, cost, beta sweep)",
        description="Rebuilds the HD-CNN from the checkpoint's hierarchy and config and evaluates it.",
    )
    ev.add_argument("--checkpoint", required=True, help="hdcnn.pt (or any checkpoint of an HD-CNN stage)")
    ev.add_argument(
        "--beta",
        type=float,
        action="append",
        default=None,
        metavar="BETA",
        help="conditional execution threshold 1/(beta K) to sweep (repeatable); default: the recipe's hdcnn.beta_sweep",
    )
    add_set(ev, "a value of the checkpoint's config, e.g. data.root=/data")
    ev.add_argument("--out", default=None, help="write the report JSON here")
    add_quiet(ev)
    ev.set_defaults(func=run_eval)


def _pct(v: float | None) -> str:
    return pct(v, suffix="")


def _print_sweep(report: dict[str, Any]) -> None:
    print("\nConditional execution (test split):")
    print("| beta | top-1 % | top-5 % | components run / image | ms / image |")
    print("|---|---|---|---|---|")
    for row in report["beta_sweep"]:
        beta = "all" if row["beta"] is None else f"{row['beta']:g}"
        print(
            f"| {beta} | {_pct(row['top1'])} | {_pct(row['top5'])} | {row['components_run']:.2f} | "
            f"{row['ms_per_image']:.3f} |"
        )


def print_report(report: dict[str, Any]) -> None:
    """The learnt groups by class name, then building block vs HD-CNN accuracy and the beta sweep."""
    if "groups" in report:
        print("Learnt coarse categories (disjoint groups; partial sets add the overlapping classes):")
        for k, (group, partial) in enumerate(zip(report["groups"], report["partial_sets"])):
            extra = [c for c in partial if c not in group]
            print(f"  {k}: {', '.join(group)}" + (f"  (+ {', '.join(extra)})" if extra else ""))
    print("\n| model | top-1 % | top-5 % |")
    print("|---|---|---|")
    for key, label in (
        ("block", "building block"),
        ("hdcnn_no_finetune", "HD-CNN, no fine-tuning"),
        ("hdcnn", "HD-CNN"),
    ):
        if key in report:
            print(f"| {label} | {_pct(report[key]['top1'])} | {_pct(report[key]['top5'])} |")
    coarse = report.get("coarse", {})
    if coarse:
        print(
            "\nCoarse accuracy (learnt groups): "
            f"coarse component {_pct(coarse['coarse_component_accuracy'])} %, "
            f"fine prediction in the right group {_pct(coarse['learnt_coarse_accuracy'])} %"
        )
    if "reference" in report:
        sev = report["reference"]["severity"]
        print(
            f"Versus the reference taxonomy: coarse accuracy {_pct(sev['coarse_accuracy'])} %, "
            f"{_pct(sev['cross_fraction'])} % of errors cross groups"
        )
    _print_sweep(report)


def run_fit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    report = run_pipeline(cfg, resume=not args.restart, progress=not args.quiet)
    if "rank" in report:  # another process of a torchrun launch: rank 0 evaluates and prints
        return 0
    print_report(report)
    print(f"\nreport: {Path(cfg.run_dir) / 'hdcnn_report.json'}; checkpoint: {report['checkpoint']}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    trained = load_trained(args.checkpoint, overrides=args.overrides)
    model, cfg = trained.model, trained.cfg
    if not isinstance(model, HDCNN) or trained.facts.hdcnn is None:
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} holds a {type(model).__name__} without an HD-CNN hierarchy: "
            "not written by c2f hdcnn fit"
        )
    h = Hierarchy.from_dict(trained.facts.hdcnn.hierarchy, source=args.checkpoint)
    bundle = build_datasets(cfg, run_dir=trained.run_dir, progress=not args.quiet)
    check_classes(trained.classes, bundle.classes, f"checkpoint {args.checkpoint!r}")
    betas = args.beta if args.beta is not None else cfg.hdcnn.beta_sweep
    report = evaluate_hdcnn(
        cfg,
        model,
        h,
        build_loaders(cfg, bundle).test,
        betas=betas,
        progress=not args.quiet,
        reference=reference_taxonomy(cfg, bundle),
    )
    report.update(groups=h.groups(), partial_sets=h.partial_groups(), checkpoint=args.checkpoint)
    print_report(report)
    if args.out:
        atomic_write_json(args.out, report)
        print(f"\nreport: {args.out}")
    return 0

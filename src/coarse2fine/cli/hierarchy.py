"""``c2f hierarchy`` (learn HD-CNN's category hierarchy from a trained block) and ``c2f compress``
(product-quantise a trained model's layers), SPEC 2.1 and 2.4."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from coarse2fine.errors import CheckpointError, ModelError

# checkpoint entries that do not survive compression (the optimiser state is for other tensors)
_DROPPED_ON_COMPRESS = ("optimizer", "scheduler", "scaler", "rng", "ema")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the checkpoint's config, e.g. data.root=/data (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    h = subparsers.add_parser(
        "hierarchy",
        help="learn HD-CNN's category hierarchy from a trained building block",
        description="Softmax of the checkpoint's model on the held-out (validation) split -> confusion "
        "matrix -> clustering into coarse categories -> overlapping partial sets (SPEC 2.1). Writes "
        "hierarchy.json, hierarchy.png and hierarchy_report.json, prints the groups and their agreement "
        "(ARI / NMI) with the reference taxonomy.",
    )
    h.add_argument("--checkpoint", required=True, help="a training checkpoint, e.g. RUN/checkpoints/best.pt")
    h.add_argument("--num-coarse", type=int, default=None, help="K (default: the config's hdcnn.num_coarse)")
    h.add_argument(
        "--method",
        choices=("spectral", "affinity"),
        default=None,
        help="spectral clustering (paper) or kNN + Laplacian eigenmap + affinity propagation (authors' "
        "code; K is then an outcome). Default: the config's hdcnn.clustering",
    )
    h.add_argument("--gamma", type=float, default=None, help="u_t = 1/(gamma K) (default: hdcnn.gamma)")
    h.add_argument("--max-partial-size", type=int, default=None, help="cap |S_k| (default: hdcnn.max_partial_size)")
    h.add_argument("--reference", default=None, help="JSON {coarse: [fine, ...]} to compare with")
    h.add_argument("--seed", type=int, default=None, help="clustering seed (default: the config's seed)")
    h.add_argument("--out", default=None, help="output folder (default: the checkpoint's run folder)")
    _add_common(h)
    h.set_defaults(func=run_hierarchy)

    c = subparsers.add_parser(
        "compress",
        help="product-quantise a trained model's layers (HD-CNN compression)",
        description="Each chosen layer's weight (conv flattened to out x in*kh*kw) is split into column "
        "segments of width s, k-means with k centres per segment, uint8 codes + fp32 centres (SPEC 2.4); "
        "axis 'columns' quantises the transposed weight instead (better for layers with few rows). "
        "Saves a checkpoint whose metadata names the compressed layers.",
    )
    c.add_argument("--checkpoint", required=True, help="a training checkpoint")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME=S:K[:AXIS]",
        help="layers to compress, e.g. classifier.0=14:64 classifier.3=4:256:columns",
    )
    which.add_argument("--auto", action="store_true", help="every Linear (s=4) and kxk Conv2d (s=3) worth compressing")
    c.add_argument(
        "--axis",
        choices=("rows", "columns", "auto"),
        default="rows",
        help="--auto: cluster the weight's row segments (SPEC), its column segments (W^T), or per layer "
        "the longer side (default: rows)",
    )
    c.add_argument("--linear", default=None, metavar="S:K", help="--auto: s and largest k of Linear layers (4:256)")
    c.add_argument("--conv", default=None, metavar="S:K", help="--auto: s and largest k of kxk convs (3:128)")
    c.add_argument(
        "--rear",
        action="store_true",
        help="HD-CNN with --auto: only the coarse and fine components (the shared layers stay fp32)",
    )
    c.add_argument("--out", default=None, help="compressed checkpoint (default: <checkpoint>_pq.pt beside it)")
    c.add_argument("--eval", action="store_true", help="test-split accuracy before and after")
    c.add_argument("--seed", type=int, default=0, help="k-means seed")
    c.add_argument(
        "--backend",
        choices=("sklearn", "torch"),
        default="sklearn",
        help="k-means: scikit-learn per segment, or batched torch (fast for big layers, uses the GPU)",
    )
    _add_common(c)
    c.set_defaults(func=run_compress)


# ---- shared: a trained model from a checkpoint ----------------------------------------------------


def load_model(path: str | Path, overrides: list[str] | None = None) -> tuple[nn.Module, Any, list[str], dict]:
    """``(model in eval mode, config with overrides, classes, checkpoint)``; compressed checkpoints too."""
    from coarse2fine.build import load_trained

    t = load_trained(path, overrides=overrides)
    return t.model, t.cfg, t.classes, t.checkpoint


def _data(cfg: Any, classes: list[str], path: str | Path) -> tuple[Any, Any]:
    from coarse2fine.build import build_datasets, build_loaders

    bundle = build_datasets(cfg)
    if list(bundle.classes) != classes:
        extra = sorted(set(bundle.classes) ^ set(classes))[:5]
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained on other classes than the data's "
            f"({len(classes)} vs {len(bundle.classes)}; e.g. {extra or 'another order'})"
        )
    return bundle, build_loaders(cfg, bundle)


# ---- c2f hierarchy --------------------------------------------------------------------------------


def learn_and_save(
    probs: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    out_dir: str | Path,
    *,
    num_coarse: int,
    method: str = "spectral",
    gamma: float = 5.0,
    max_partial_size: int | None = None,
    seed: int = 0,
    reference: dict[str, list[str]] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Learn the hierarchy from held-out ``probs``, write ``hierarchy.json`` / ``.png`` /
    ``hierarchy_report.json`` under ``out_dir`` and return the report (groups, scores)."""
    from coarse2fine.engine.checkpoint import atomic_write_json
    from coarse2fine.hierarchy import (
        compare_to_reference,
        confusion_matrix,
        learn_hierarchy,
        mistake_severity,
        plot_hierarchy,
    )

    h = learn_hierarchy(
        probs, targets, classes, num_coarse, method=method, gamma=gamma, max_partial_size=max_partial_size, seed=seed
    )
    out = Path(out_dir)
    F = confusion_matrix(probs, targets, len(classes))
    paths = {
        "hierarchy": h.save(out / "hierarchy.json"),
        "picture": plot_hierarchy(h, F, out / "hierarchy.png", title=title),
    }
    pred = probs.argmax(axis=1)
    report: dict[str, Any] = {
        "num_heldout": int(targets.shape[0]),
        "heldout_top1": float((pred == targets).mean()) if targets.size else None,
        "method": method,
        "num_coarse": h.num_coarse,
        "gamma": gamma,
        "u_t": h.meta["u_t"],
        "groups": h.groups(),
        "partial_sets": h.partial_groups(),
        "coarse_names": h.coarse_names,
        "severity_learnt": mistake_severity(pred, targets, h),
        "reference": None,
    }
    if reference:
        report["reference"] = {
            "scores": compare_to_reference(h, reference),
            "severity": mistake_severity(pred, targets, reference, class_names=classes),
        }
    paths["report"] = atomic_write_json(out / "hierarchy_report.json", report)
    report["paths"] = {k: str(v) for k, v in paths.items()}
    return report


def print_hierarchy_report(report: dict[str, Any]) -> None:
    print(
        f"{report['num_coarse']} coarse categories from {report['num_heldout']} held-out images "
        f"(block top-1 {100 * (report['heldout_top1'] or 0):.2f} %, u_t = {report['u_t']:.4f}):"
    )
    for k, (group, partial) in enumerate(zip(report["groups"], report["partial_sets"])):
        extra = [c for c in partial if c not in group]
        print(f"  {k}: {', '.join(group)}" + (f"  (+ {', '.join(extra)})" if extra else ""))
    sev = report["severity_learnt"]
    print(f"block errors inside a learnt group: {100 * sev['within_fraction']:.1f} %")
    ref = report.get("reference")
    if ref:
        s = ref["scores"]
        print(
            f"versus the reference taxonomy ({s['reference_num_coarse']} groups, {s['classes_compared']} classes): "
            f"ARI {s['ari']:.3f}, NMI {s['nmi']:.3f}, purity {s['purity']:.3f}; block errors inside a "
            f"reference group: {100 * ref['severity']['within_fraction']:.1f} %"
        )
    else:
        print("no reference taxonomy (give --reference FILE.json to compare)")
    for name, path in report.get("paths", {}).items():
        print(f"{name}: {path}")


def _default_out(checkpoint: str | Path) -> Path:
    p = Path(checkpoint).resolve().parent
    return p.parent if p.name == "checkpoints" else p


def run_hierarchy(args: argparse.Namespace) -> int:
    from coarse2fine.engine.evaluate import predict_proba, resolve_device
    from coarse2fine.hierarchy import load_reference

    model, cfg, classes, _ = load_model(args.checkpoint, args.overrides)
    bundle, loaders = _data(cfg, classes, args.checkpoint)
    device = resolve_device(cfg.train.device)
    model.to(device)
    probs, targets = predict_proba(
        model, loaders.val, device=device, amp=cfg.train.amp, progress=not args.no_progress, desc="held-out"
    )
    if args.reference:
        reference = load_reference(args.reference)
    elif cfg.hdcnn.reference_hierarchy:
        reference = load_reference(cfg.hdcnn.reference_hierarchy)
    else:
        reference = bundle.reference_hierarchy
    hc = cfg.hdcnn
    report = learn_and_save(
        probs,
        targets,
        classes,
        args.out or _default_out(args.checkpoint),
        num_coarse=args.num_coarse if args.num_coarse is not None else hc.num_coarse,
        method=args.method or hc.clustering,
        gamma=args.gamma if args.gamma is not None else hc.gamma,
        max_partial_size=args.max_partial_size if args.max_partial_size is not None else hc.max_partial_size,
        seed=args.seed if args.seed is not None else cfg.seed,
        reference=reference,
        title=f"{cfg.name}: learnt hierarchy",
    )
    print_hierarchy_report(report)
    return 0


# ---- c2f compress ---------------------------------------------------------------------------------


def compressed_checkpoint(ckpt: dict[str, Any], model: nn.Module, report: Any, **extra: Any) -> dict[str, Any]:
    """The checkpoint of a compressed model: config, classes, metadata + ``compression`` spec, report.

    ``report``: a ``CompressionReport`` or the dict of ``compress_hdcnn`` (whose ``spec`` names every
    quantised tensor of the HD-CNN).
    """
    out = {k: v for k, v in ckpt.items() if k not in _DROPPED_ON_COMPRESS}
    out["model"] = model.state_dict()
    metadata = dict(ckpt.get("metadata") or {})
    metadata["compression"] = report["spec"] if isinstance(report, dict) else report.spec()
    out["metadata"] = metadata
    out["compression_report"] = report if isinstance(report, dict) else report.to_dict()
    out.update(extra)
    return out


_HDCNN_PARTS = ("shared", "coarse", "fine")


def _hdcnn_layers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"fine.stage3.conv1": (s, k)}`` -> ``{"fine": {"stage3.conv1": (s, k)}}`` (names start with a part)."""
    parts: dict[str, dict[str, Any]] = {}
    for name, sk in spec.items():
        part, _, inner = name.partition(".")
        if part not in _HDCNN_PARTS or not inner:
            raise ModelError(
                f"HD-CNN compression: layer {name!r} must start with shared., coarse. or fine. "
                "(e.g. fine.stage3.conv1=2:128:columns; fine applies to every fine component)"
            )
        parts.setdefault(part, {})[inner] = sk
    return parts


def _print_hdcnn_compression(result: dict[str, Any]) -> None:
    rows = ["| part | layer | shape | axis | s | k | factor | rel. error |", "|---|---|---|---|---:|---:|---:|---:|"]
    sections = [("shared", result["shared_layers"]), ("coarse", result["coarse_component"])]
    sections += [(f"fine {k}", r) for k, r in enumerate(result["fine_components"])]
    for part, rep in sections:
        for r in (rep or {}).get("layers", []):
            rows.append(
                f"| {part} | {r['name']} | {'x'.join(map(str, r['shape']))} | {r['axis']} | {r['s']} | {r['k']} | "
                f"{r['factor']:.2f}x | {r['rel_error']:.4f} |"
            )
    print("\n".join(rows))
    print(
        f"\nrear layers (coarse + fine components): {result['rear_bytes_before']:,} -> "
        f"{result['rear_bytes_after']:,} bytes ({result['rear_factor']:.2f}x smaller)"
    )


def run_compress(args: argparse.Namespace) -> int:
    from coarse2fine.engine import evaluate, save_checkpoint
    from coarse2fine.engine.evaluate import resolve_device
    from coarse2fine.hdcnn.compression import auto_spec, compress_model, compression_of, parse_layer_spec
    from coarse2fine.hdcnn.evaluation import compress_hdcnn
    from coarse2fine.hdcnn.model import HDCNN

    model, cfg, classes, ckpt = load_model(args.checkpoint, args.overrides)
    if compression_of(ckpt):
        raise CheckpointError(f"checkpoint {args.checkpoint!r} is already compressed")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "_pq.pt")
    if out.resolve() == Path(args.checkpoint).resolve():
        raise CheckpointError(f"--out {str(out)!r} would overwrite the input checkpoint")
    hdcnn = isinstance(model, HDCNN)
    rule: dict[str, Any] = {"axis": args.axis}
    for kind in ("linear", "conv"):
        if getattr(args, kind):
            rule[kind] = parse_layer_spec([f"{kind}={getattr(args, kind)}"])[kind][:2]
    if args.rear and not hdcnn:
        raise ModelError(f"--rear needs an HD-CNN checkpoint; {args.checkpoint!r} holds a {type(model).__name__}")
    if hdcnn:
        spec: Any = ("rear" if args.rear else "auto") if args.auto else _hdcnn_layers(parse_layer_spec(args.layers))
    else:
        spec = auto_spec(model, **rule) if args.auto else parse_layer_spec(args.layers)
    device = resolve_device(cfg.train.device)
    model.to(device)
    results: dict[str, Any] = {}

    def test_accuracy(tag: str) -> None:
        r = evaluate(
            model,
            loaders.test,
            num_classes=len(classes),
            device=device,
            amp=cfg.train.amp,
            progress=not args.no_progress,
            desc=f"test ({tag})",
        )
        results[tag] = {"top1": r.top1, "top5": r.top5}

    if args.eval:
        _, loaders = _data(cfg, classes, args.checkpoint)
        test_accuracy("before")
    if hdcnn:
        report: Any = compress_hdcnn(model, spec, seed=args.seed, backend=args.backend, **(rule if args.auto else {}))
        before, after = report["bytes_before"], report["bytes_after"]
    else:
        report = compress_model(model, spec, seed=args.seed, backend=args.backend, device=device)
        before, after = report.model_bytes_before, report.model_bytes_after
    if args.eval:
        test_accuracy("after")
    if hdcnn:
        _print_hdcnn_compression(report)
    else:
        print(report.table())
    print(f"\nmodel: {before:,} -> {after:,} bytes ({before / max(after, 1):.2f}x smaller)")
    if results:
        b, a = results["before"], results["after"]
        print(
            f"test top-1: {100 * b['top1']:.2f} % -> {100 * a['top1']:.2f} %; "
            f"top-5: {100 * b['top5']:.2f} % -> {100 * a['top5']:.2f} %"
        )
    save_checkpoint(compressed_checkpoint(ckpt, model.cpu(), report, compression_eval=results), out)
    print(f"compressed checkpoint: {out}")
    return 0

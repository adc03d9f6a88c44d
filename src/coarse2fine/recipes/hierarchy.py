"""Learning HD-CNN's category hierarchy from a trained block (METHODS.md §2.1): the one code path used
by ``c2f hierarchy`` and by the hierarchy stage of ``c2f hdcnn fit``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from coarse2fine.config import HDCNNConfig
from coarse2fine.engine.checkpoint import atomic_write_json, check_classes
from coarse2fine.engine.evaluate import predict_proba, resolve_device
from coarse2fine.hierarchy import (
    Hierarchy,
    compare_to_reference,
    confusion_matrix,
    learn_hierarchy,
    load_reference,
    mistake_severity,
    partition_scores,
    plot_hierarchy,
)
from coarse2fine.recipes.data import build_datasets, build_loaders
from coarse2fine.recipes.hdcnn_report import reference_taxonomy
from coarse2fine.recipes.trained import load_trained


def learn_from_probs(
    probs: np.ndarray, targets: np.ndarray, classes: list[str], hc: HDCNNConfig, *, seed: int
) -> Hierarchy:
    """The hierarchy of ``hc`` (K, clustering, gamma, partial-set cap) from held-out ``probs``."""
    return learn_hierarchy(
        probs,
        targets,
        classes,
        hc.num_coarse,
        method=hc.clustering,
        gamma=hc.gamma,
        max_partial_size=hc.max_partial_size,
        seed=seed,
    )


def write_hierarchy(
    h: Hierarchy,
    probs: np.ndarray,
    targets: np.ndarray,
    out_dir: str | Path,
    *,
    reference: dict[str, list[str]] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Write ``hierarchy.json`` / ``.png`` / ``hierarchy_report.json`` under ``out_dir``; return the report.

    The report carries the partition's quality (METHODS.md eqs. (11a), (11b); computed here when ``h.meta``
    lacks it) and, for ``auto``, which candidate won and every candidate's scores.
    """
    classes = h.class_names
    out = Path(out_dir)
    F = confusion_matrix(probs, targets, len(classes))
    if "quality" not in h.meta:
        h = replace(h, meta={**h.meta, "quality": partition_scores(F, h.coarse_of)})
    paths = {
        "hierarchy": h.save(out / "hierarchy.json"),
        "picture": plot_hierarchy(h, F, out / "hierarchy.png", title=title),
    }
    pred = probs.argmax(axis=1)
    report: dict[str, Any] = {
        "num_heldout": int(targets.shape[0]),
        "heldout_top1": float((pred == targets).mean()) if targets.size else None,
        "method": h.meta.get("method"),
        "num_coarse": h.num_coarse,
        "gamma": h.meta.get("gamma"),
        "u_t": h.meta["u_t"],
        "groups": h.groups(),
        "partial_sets": h.partial_groups(),
        "coarse_names": h.coarse_names,
        "severity_learnt": mistake_severity(pred, targets, h),
        "quality": h.meta["quality"],
        "selection": h.meta.get("selection"),
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


@dataclass
class HierarchyRequest:
    """``c2f hierarchy``: a trained block's checkpoint and the settings that override its recipe's."""

    checkpoint: str
    overrides: list[str]
    out: str | None = None
    reference: str | None = None
    seed: int | None = None  # the clustering's seed; None: the recipe's seed (which also drew the split)
    progress: bool = True


def _default_out(checkpoint: str | Path) -> Path:
    p = Path(checkpoint).resolve().parent
    return p.parent if p.name == "checkpoints" else p


def hierarchy_from_checkpoint(req: HierarchyRequest) -> dict[str, Any]:
    """The block's softmax on its run's held-out split -> hierarchy files and report."""
    trained = load_trained(req.checkpoint, overrides=req.overrides)
    cfg = trained.cfg
    bundle = build_datasets(cfg, run_dir=trained.run_dir, progress=req.progress)
    check_classes(trained.classes, bundle.classes, f"checkpoint {req.checkpoint!r}")
    loaders = build_loaders(cfg, bundle)
    device = resolve_device(cfg.train.device)
    trained.model.to(device)
    probs, targets = predict_proba(
        trained.model, loaders.val, device=device, amp=cfg.train.amp, progress=req.progress, desc="held-out"
    )
    reference = load_reference(req.reference) if req.reference else reference_taxonomy(cfg, bundle)
    seed = cfg.seed if req.seed is None else req.seed
    h = learn_from_probs(probs, targets, trained.classes, cfg.hdcnn, seed=seed)
    out = req.out or _default_out(req.checkpoint)
    return write_hierarchy(h, probs, targets, out, reference=reference, title=f"{cfg.name}: learnt hierarchy")

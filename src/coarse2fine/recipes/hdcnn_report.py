"""HD-CNN's test report (METHODS.md §2.4): accuracy of the block, the HD-CNN before and after
fine-tuning, coarse accuracy and mistake severity, cost, and the conditional-execution sweep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from coarse2fine.config import RunConfig
from coarse2fine.engine.evaluate import evaluate, resolve_device
from coarse2fine.hdcnn import HDCNN, inference_pass, peak_memory_bytes
from coarse2fine.hierarchy import Hierarchy, compare_to_reference, load_reference, mistake_severity
from coarse2fine.recipes.data import DataBundle


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def evaluate_hdcnn(
    cfg: RunConfig,
    model: HDCNN,
    h: Hierarchy,
    test_loader: Any,
    *,
    block: nn.Module | None = None,
    initial: HDCNN | None = None,
    reference: dict[str, list[str]] | None = None,
    betas: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Test-split metrics of METHODS.md §2.4: accuracy, coarse accuracy, severity, cost, beta sweep.

    ``report["hdcnn"]`` is the model at its own ``beta`` (``hdcnn.beta``; None: every component);
    ``beta_sweep`` starts with every component run (``beta: null``) then each beta of ``betas``;
    ``coarse`` and ``reference`` use the all-component predictions.
    """
    device = resolve_device(cfg.train.device)
    num_classes = len(h.class_names)
    model.to(device)
    amp = cfg.train.amp
    full = evaluate(
        model,
        test_loader,
        num_classes=num_classes,
        device=device,
        amp=amp,
        progress=progress,
        desc="test HD-CNN",
    )
    report: dict[str, Any] = {"hdcnn": full.to_dict(h.class_names)}
    base = inference_pass(model, test_loader, device=device, beta=None, amp=amp)
    coarse_of = np.asarray(h.coarse_of)
    report["coarse"] = {
        "coarse_component_accuracy": float((base.coarse_pred == coarse_of[base.target]).mean()),
        **{f"learnt_{k}": v for k, v in mistake_severity(base.pred, base.target, h).items()},
    }
    if reference:
        report["reference"] = {
            "hierarchy_vs_reference": compare_to_reference(h, reference),
            "severity": mistake_severity(base.pred, base.target, reference, class_names=h.class_names),
        }
    report["beta_sweep"] = _beta_sweep(model, test_loader, base, betas, device=device, amp=amp)
    images = next(iter(test_loader))[0].to(device)
    report["cost"] = {
        "batch_size": int(images.shape[0]),
        "hdcnn_parameters": _param_count(model),
        "shared_parameters": _param_count(model.shared),
        "coarse_component_parameters": _param_count(model.coarse),
        "fine_component_parameters": _param_count(model.fine),
        "hdcnn_peak_bytes": peak_memory_bytes(model, images),
        "hdcnn_ms_per_image": base.ms_per_image,
        "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocations",
    }
    if cfg.hdcnn.beta is not None:
        report["cost"]["hdcnn_conditional_peak_bytes"] = peak_memory_bytes(model, images, beta=cfg.hdcnn.beta)
    if block is not None:
        report["block"], block_cost = _block_report(block, test_loader, h, reference, images, device=device, amp=amp)
        report["cost"].update(block_cost)
    if initial is not None:
        initial.to(device)
        ires = evaluate(
            initial,
            test_loader,
            num_classes=num_classes,
            device=device,
            amp=amp,
            desc="test HD-CNN (no fine-tuning)",
        )
        report["hdcnn_no_finetune"] = ires.to_dict(h.class_names)
    return report


def reference_taxonomy(cfg: RunConfig, bundle: DataBundle) -> dict[str, list[str]] | None:
    """``hdcnn.reference_hierarchy`` (JSON file) or else the data's own (CIFAR-100 superclasses)."""
    if cfg.hdcnn.reference_hierarchy:
        return load_reference(cfg.hdcnn.reference_hierarchy)
    return getattr(bundle, "reference_hierarchy", None)




def _beta_sweep(
    model: HDCNN, loader: Any, base: Any, betas: Sequence[float] | None, *, device: torch.device, amp: str
) -> list[dict[str, Any]]:
    """Every component run (``beta: null``, the pass ``base``), then conditional execution at each beta."""
    sweep = []
    for beta in [None, *sorted(betas or [])]:
        res = base if beta is None else inference_pass(model, loader, device=device, beta=beta, amp=amp)
        sweep.append(
            {
                "beta": beta,
                "top1": res.top1,
                "top5": res.top5,
                "components_run": res.components_run,
                "ms_per_image": res.ms_per_image,
            }
        )
    return sweep


def _block_report(
    block: nn.Module,
    loader: Any,
    h: Hierarchy,
    reference: dict[str, list[str]] | None,
    images: torch.Tensor,
    *,
    device: torch.device,
    amp: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The building block's test metrics (with mistake severity) and its cost, beside the HD-CNN's."""
    block.to(device)
    bres = evaluate(block, loader, num_classes=len(h.class_names), device=device, amp=amp, desc="test block")
    bpass = inference_pass(block, loader, device=device, amp=amp)
    report = bres.to_dict(h.class_names)
    report["severity_learnt"] = mistake_severity(bpass.pred, bpass.target, h)
    if reference:
        report["severity_reference"] = mistake_severity(bpass.pred, bpass.target, reference, class_names=h.class_names)
    cost = {
        "block_parameters": _param_count(block),
        "block_peak_bytes": peak_memory_bytes(block, images),
        "block_ms_per_image": bpass.ms_per_image,
    }
    return report, cost

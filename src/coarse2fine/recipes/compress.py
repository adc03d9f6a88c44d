"""Compressing a trained checkpoint by product quantisation (METHODS.md §2.4): any model through
``coarse2fine.compress``, an HD-CNN part by part through ``hdcnn.compress_hdcnn``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from coarse2fine.compress import CompressionReport, auto_spec, compress_model, parse_layer_spec
from coarse2fine.engine import evaluate, save_checkpoint
from coarse2fine.engine.checkpoint import check_classes
from coarse2fine.engine.evaluate import resolve_device
from coarse2fine.errors import CheckpointError, ModelError
from coarse2fine.hdcnn import HDCNN, compress_hdcnn
from coarse2fine.recipes.data import build_datasets, build_loaders
from coarse2fine.recipes.trained import Trained, load_trained

# checkpoint entries that do not survive compression (the optimiser state is for other tensors)
_DROPPED_ON_COMPRESS = ("optimizer", "scheduler", "scaler", "rng", "ema")
_HDCNN_PARTS = ("shared", "coarse", "fine")


@dataclass
class CompressRequest:
    """``c2f compress``: which layers (``layers`` as ``NAME=S:K[:AXIS]`` or ``auto``) and how."""

    checkpoint: str
    layers: list[str] | None = None  # None: the auto rule
    axis: str = "rows"
    linear: str | None = None  # auto rule: S:K of Linear layers
    conv: str | None = None  # auto rule: S:K of kxk convs
    rear: bool = False  # HD-CNN: coarse and fine components only
    out: str | None = None
    evaluate: bool = False
    seed: int = 0
    backend: str = "sklearn"
    overrides: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class CompressResult:
    out: Path
    report: CompressionReport | dict[str, Any]  # dict: compress_hdcnn's accounting
    bytes_before: int
    bytes_after: int
    accuracy: dict[str, dict[str, float]]  # "before" / "after" test top-1 and top-5 (with evaluate)


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


def _output_path(req: CompressRequest) -> Path:
    src = Path(req.checkpoint)
    out = Path(req.out) if req.out else src.with_name(src.stem + "_pq.pt")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"--out {str(out)!r} would overwrite the input checkpoint")
    return out


def _spec(req: CompressRequest, model: nn.Module) -> tuple[Any, dict[str, Any]]:
    """The layer spec (or HD-CNN's ``auto`` / ``rear`` rule) and the auto rule's keyword arguments."""
    rule: dict[str, Any] = {"axis": req.axis}
    for kind in ("linear", "conv"):
        if getattr(req, kind):
            rule[kind] = parse_layer_spec([f"{kind}={getattr(req, kind)}"])[kind][:2]
    if isinstance(model, HDCNN):
        if req.layers is None:
            return ("rear" if req.rear else "auto"), rule
        return _hdcnn_layers(parse_layer_spec(req.layers)), {}
    if req.rear:
        raise ModelError(f"--rear needs an HD-CNN checkpoint; {req.checkpoint!r} holds a {type(model).__name__}")
    return (auto_spec(model, **rule) if req.layers is None else parse_layer_spec(req.layers)), rule


def _test_accuracy(trained: Trained, loader: Any, tag: str, progress: bool) -> dict[str, float]:
    cfg = trained.cfg
    r = evaluate(
        trained.model,
        loader,
        num_classes=len(trained.classes),
        device=resolve_device(cfg.train.device),
        amp=cfg.train.amp,
        progress=progress,
        desc=f"test ({tag})",
    )
    return {"top1": r.top1, "top5": r.top5}


def compress_checkpoint(req: CompressRequest) -> CompressResult:
    """Quantise the checkpoint's layers, optionally measure test accuracy before and after, save."""
    trained = load_trained(req.checkpoint, overrides=req.overrides)
    model, ckpt = trained.model, trained.checkpoint
    if trained.facts.compression:
        raise CheckpointError(f"checkpoint {req.checkpoint!r} is already compressed")
    out = _output_path(req)
    spec, rule = _spec(req, model)
    device = resolve_device(trained.cfg.train.device)
    model.to(device)
    accuracy: dict[str, dict[str, float]] = {}
    if req.evaluate:
        bundle = build_datasets(trained.cfg, run_dir=trained.run_dir, progress=req.progress)
        check_classes(trained.classes, bundle.classes, f"checkpoint {req.checkpoint!r}")
        loader = build_loaders(trained.cfg, bundle).test
        accuracy["before"] = _test_accuracy(trained, loader, "before", req.progress)
    report: Any
    if isinstance(model, HDCNN):
        report = compress_hdcnn(model, spec, seed=req.seed, backend=req.backend, **rule)
        before, after = report["bytes_before"], report["bytes_after"]
    else:
        report = compress_model(model, spec, seed=req.seed, backend=req.backend, device=device)
        before, after = report.model_bytes_before, report.model_bytes_after
    if req.evaluate:
        accuracy["after"] = _test_accuracy(trained, loader, "after", req.progress)
    save_checkpoint(compressed_checkpoint(ckpt, model.cpu(), report, compression_eval=accuracy), out)
    return CompressResult(out, report, before, after, accuracy)

"""Taking a trained model out (``c2f export``): safetensors + ``config.json`` (``recipes.exported``), or ONNX.

ONNX (opset 17, TorchScript-based exporter ``torch.onnx.export(..., dynamo=False)``, dynamic batch axis):
input ``input`` ``(batch, C, H, W)`` float32, normalised as ``config.json`` / the metadata say; output
``probs`` ``(batch, classes)``, rows summing to 1:

- plain models: the softmax of the logits;
- HERBS: the mean of the softmax of all its heads (METHODS.md §3: their sum, normalised);
- HD-CNN: every fine component with probabilistic averaging (``beta=None``,
  :class:`~coarse2fine.hdcnn.UnrolledHDCNN`), plus ``coarse_probs`` ``(batch, K)``; conditional
  execution needs the PyTorch runtime (``c2f predict --beta``), as the model's metadata says.

A product-quantised model exports with its weights reconstructed (ONNX has no codebook layer). Each
export is checked once with onnxruntime against PyTorch on a batch of another size (at most 1e-4 apart).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coarse2fine.config import to_dict
from coarse2fine.engine.objective import logits_of
from coarse2fine.errors import C2FError, ConfigError, ModelError
from coarse2fine.hdcnn import HDCNN, UnrolledHDCNN
from coarse2fine.hierarchy import Hierarchy
from coarse2fine.recipes.exported import describe, export_files, is_export, write_export
from coarse2fine.recipes.outputs import checked_output_file, checked_output_folder, make_readable
from coarse2fine.recipes.trained import Trained, load_trained

FORMATS = ("safetensors", "onnx")
OPSET = 17
CHECK_TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| accepted on the check batch (probabilities)
INSTALL_HINT = "pip install coarse2fine[export]"
CONDITIONAL_NOTE = (
    "this graph runs every fine component with probabilistic averaging (beta=None); conditional execution "
    "(beta: only the fine components an image needs) needs the PyTorch runtime: c2f predict --beta"
)


@dataclass
class ExportRequest:
    """``c2f export``: the checkpoint (or an export) to take out, the format and where to write it."""

    checkpoint: str
    format: str = "safetensors"
    out: str | None = None  # None: beside the checkpoint (<stem>_export/ or <stem>.onnx)
    overrides: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    format: str
    files: list[Path]  # the weights (or .onnx) first
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # ONNX: onnxruntime vs PyTorch on the check batch

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def require_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules (optional dependencies), or a C2FError naming the install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise C2FError(f"ONNX export needs the onnx and onnxruntime packages ({exc}): {INSTALL_HINT}") from None
    return onnx, onnxruntime


class Probabilities(nn.Module):
    """A model's prediction as probabilities: the softmax of its logits (HERBS: of log mean softmax)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(logits_of(self.model(x)).float(), dim=1)


def _graph(trained: Trained) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """The module to trace, its output names and the method's metadata."""
    model = trained.model
    if isinstance(model, HDCNN):
        h = trained.facts.hdcnn
        names = Hierarchy.from_dict(h.hierarchy).coarse_names if h is not None else []
        extra = {"coarse_names": names, "partial_sets": model.partial_sets, "conditional_execution": CONDITIONAL_NOTE}
        return UnrolledHDCNN(model).eval(), ["probs", "coarse_probs"], extra
    return Probabilities(model).eval(), ["probs"], {}


def _trace(module: nn.Module, x: Tensor, path: Path, outputs: list[str]) -> None:
    axes = {name: {0: "batch"} for name in ["input", *outputs]}
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": outputs, "dynamic_axes": axes}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: no onnxscript needed
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), opset_version=OPSET, do_constant_folding=True, **kwargs)


def _metadata(trained: Trained, outputs: list[str], extra: dict[str, Any]) -> dict[str, str]:
    info = describe(trained.cfg, trained.facts)
    info.pop("hierarchy")
    info["outputs"] = {
        "probs": "(batch, classes) class probabilities, rows sum to 1",
        **({"coarse_probs": "(batch, K) coarse category probabilities B_ik"} if "coarse_probs" in outputs else {}),
    }
    info.update(extra)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items() if v is not None}


def _compare(ort: Any, path: Path, module: nn.Module, x: Tensor) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = module(x)
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def export_onnx(trained: Trained, out: Path) -> ExportResult:
    """Trace ``trained.model`` to ONNX at ``out`` (a temporary file in the same folder, then renamed)."""
    onnx, ort = require_onnx()
    module, outputs, extra = _graph(trained)
    module.cpu()
    f = trained.facts
    x = torch.randn(2, f.in_chans, f.image_size, f.image_size, generator=torch.Generator().manual_seed(0))
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            _trace(module, x, tmp, outputs)
        except Exception as exc:  # the exporter's own errors: an operator without ONNX support, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelError(
                f"{type(trained.model).__name__} ({trained.cfg.model.name}) cannot be exported to ONNX: {first}"
            ) from exc
        proto = onnx.load(str(tmp))
        for key, value in _metadata(trained, outputs, extra).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "coarse2fine"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        check = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))  # another batch size
        diff = _compare(ort, tmp, module, check)
        if not diff <= CHECK_TOLERANCE:
            raise ModelError(
                f"the ONNX graph of {trained.cfg.model.name} differs from PyTorch by {diff:.3g} on a test batch "
                f"(more than {CHECK_TOLERANCE}); not written"
            )
        make_readable(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    notes = [CONDITIONAL_NOTE] if isinstance(trained.model, HDCNN) else []
    if trained.facts.compression:
        notes.append("product-quantised layers exported with their weights reconstructed")
    return ExportResult("onnx", [out], notes, diff)


def default_out(checkpoint: str, fmt: str) -> Path:
    src = Path(checkpoint)
    base = src if src.is_dir() else src.with_suffix("")
    return base.with_name(f"{base.name}.onnx") if fmt == "onnx" else base.with_name(f"{base.name}_export")


def export_model(req: ExportRequest) -> ExportResult:
    """Load the checkpoint, check ``req.out`` before any work, write the export (nothing half-written)."""
    if req.format not in FORMATS:
        raise ConfigError(f"--format {req.format!r}: choose one of {', '.join(FORMATS)}")
    if req.format == "onnx":
        require_onnx()  # before loading anything
    out = Path(req.out) if req.out else default_out(req.checkpoint, req.format)
    if req.format == "onnx":
        out = checked_output_file(out)
    elif out.suffix == ".safetensors":
        checked_output_file(out)
    else:
        checked_output_folder(out)
    src = Path(req.checkpoint)
    inputs = {src.resolve(), export_files(src)[0].resolve()} if is_export(src) else {src.resolve()}
    if (out if req.format == "onnx" else export_files(out)[0]).resolve() in inputs:
        raise ConfigError(f"--out {str(out)!r} would overwrite the input {req.checkpoint!r}")
    trained = load_trained(req.checkpoint, overrides=req.overrides)
    if req.format == "onnx":
        return export_onnx(trained, out)
    files = write_export(trained.model.state_dict(), to_dict(trained.cfg), trained.cfg, trained.facts, out)
    notes = ["product-quantised layers kept as uint8 codes + fp32 centres"] if trained.facts.compression else []
    return ExportResult("safetensors", list(files), notes)

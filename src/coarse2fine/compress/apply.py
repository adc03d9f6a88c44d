"""Applying a compression spec to any model: choose layers (``auto_spec``), quantise them in place
(``compress_model``), rebuild the structure of a compressed checkpoint (``apply_compression_structure``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from coarse2fine.compress.layers import PQConv2d, PQLinear, _layer_dims, _PQMixin
from coarse2fine.compress.quantize import (
    AXES,
    LayerSpec,
    Spec,
    _check_axis,
    _check_sk,
    compression_factor,
    oriented,
    product_quantize,
    reconstruct,
    relative_error,
)
from coarse2fine.errors import ModelError


@dataclass
class LayerReport:
    name: str
    kind: str  # linear | conv2d
    shape: list[int]  # original weight shape
    m: int
    n: int
    s: int
    k: int  # effective k (clipped to m)
    padded_n: int  # quantised dimension after zero padding (n, or m for axis="columns")
    factor: float  # METHODS.md eq. (19) on (m, n, s, k, axis)
    bytes_before: int  # fp32 weight
    bytes_after: int  # uint8 codes + fp32 centres
    rel_error: float  # ||W - W_hat||_F / ||W||_F
    axis: str = "rows"  # rows: row orientation; columns: W^T quantised


@dataclass
class CompressionReport:
    """What :func:`compress_model` did, per layer and for the whole model."""

    layers: list[LayerReport] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def model_factor(self) -> float:
        return self.model_bytes_before / max(self.model_bytes_after, 1)

    def spec(self) -> dict[str, list[Any]]:
        """``{layer: [s, k]}`` (effective k; ``[s, k, "columns"]`` for ``W^T``), JSON-able: rebuilds the
        structure with :func:`apply_compression_structure`."""
        return {r.name: [r.s, r.k] + ([r.axis] if r.axis != "rows" else []) for r in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "model_factor": self.model_factor,
        }

    def table(self) -> str:
        """Markdown table of the layers and the model totals."""
        rows = [
            "| layer | shape | axis | s | k | factor | bytes before | bytes after | rel. error |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            rows.append(
                f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.axis} | {r.s} | {r.k} | {r.factor:.2f}x | "
                f"{r.bytes_before:,} | {r.bytes_after:,} | {r.rel_error:.4f} |"
            )
        rows.append(
            f"| **model** | | | | | {self.model_factor:.2f}x | {self.model_bytes_before:,} | "
            f"{self.model_bytes_after:,} | |"
        )
        return "\n".join(rows)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the ``state_dict`` tensors: what a checkpoint stores (quantised weights as codes + centres)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor)))


def _owner_of(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """The submodule that quantises tensor ``name`` itself (``apply_pq_structure``, e.g. HD-CNN's stacked
    fine components) and the tensor's name inside it, or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if hasattr(owner, "apply_pq_structure"):
            return owner, ".".join(parts[i:])
    return None


def auto_k(m: int, k_max: int, ratio: float) -> int:
    """Centres for a layer with ``m`` rows: ``ceil(ratio * m)``, at most ``k_max``, at least 2."""
    return max(2, min(k_max, math.ceil(ratio * m)))


def auto_spec(
    model: nn.Module,
    *,
    linear: LayerSpec = (4, 256),
    conv: LayerSpec = (3, 128),
    linear_ratio: float = 0.25,
    conv_ratio: float = 2 / 3,
    min_factor: float = 1.3,
    min_params: int = 4096,
    skip: tuple[str, ...] = (),
    axis: str = "rows",
) -> dict[str, LayerSpec]:
    """Default rule. Every ``nn.Linear`` gets ``s, k_max = linear`` (the paper's fc7 setting) and every
    ``nn.Conv2d`` with a kernel larger than 1x1 gets ``conv`` (the paper's NIN setting: s=3, k=128 for
    192 rows), with ``k = auto_k(points, k_max, ratio)``: at most a quarter of a linear layer's rows and
    two thirds of a conv's (on a small Fashion-MNIST VGG, k = a quarter of the conv rows lost 55 points
    of accuracy, two thirds about 1). A layer is kept when it has at least ``min_params`` weights and
    its factor (METHODS.md eq. (19)) is at least ``min_factor``. ``axis``: ``rows`` (METHODS.md §2.4),
    ``columns`` (``W^T``) or ``auto`` (per layer, the side with more vectors to cluster: columns when ``n > m``).
    """
    spec: dict[str, LayerSpec] = {}
    for name, mod in model.named_modules():
        if name in skip or isinstance(mod, _PQMixin):
            continue
        if isinstance(mod, nn.Linear):
            (s, k_max), ratio = linear, linear_ratio
        elif isinstance(mod, nn.Conv2d) and mod.weight[0, 0].numel() > 1:
            (s, k_max), ratio = conv, conv_ratio
        else:
            continue
        m, n = _layer_dims(mod)
        ax = ("columns" if n > m else "rows") if axis == "auto" else _check_axis(axis)
        k = auto_k(oriented(m, n, ax)[0], k_max, ratio)
        if m * n >= min_params and compression_factor(m, n, s, k, ax) >= min_factor:
            spec[name] = (s, k) if ax == "rows" else (s, k, ax)
    return spec


def _parse_sk(name: str, sk: Any) -> tuple[int, int, str]:
    """``(s, k)`` or ``(s, k, axis)`` of layer ``name`` -> ``(s, k, axis)`` (axis ``rows`` by default)."""
    try:
        if isinstance(sk, str) or len(sk) not in (2, 3):
            raise ValueError
        s, k = int(sk[0]), int(sk[1])
        axis = str(sk[2]) if len(sk) == 3 else "rows"
    except (TypeError, ValueError) as exc:
        raise ModelError(f"compression: layer {name!r} needs (s, k) or (s, k, axis), got {sk!r}") from exc
    return s, k, _check_axis(axis, name)


def _resolve_spec(model: nn.Module, spec: Spec | str | None) -> dict[str, tuple[int, int, str]]:
    if spec is None or spec == "auto":
        spec = auto_spec(model)
    if isinstance(spec, str):
        raise ModelError(f"compression spec {spec!r}: expected 'auto' or a mapping layer -> (s, k)")
    modules = dict(model.named_modules())
    out: dict[str, tuple[int, int, str]] = {}
    for name, sk in spec.items():
        if name not in modules:
            layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d, _PQMixin))]
            raise ModelError(f"compression: no layer named {name!r}; weight layers: {', '.join(layers)}")
        mod = modules[name]
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise ModelError(f"compression: layer {name!r} is a {type(mod).__name__}, not Linear or Conv2d")
        s, k, axis = _parse_sk(name, sk)
        out[name] = (s, _check_sk(oriented(*_layer_dims(mod), axis)[0], s, k, name), axis)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _empty_pq(mod: nn.Module, s: int, k: int, axis: str) -> _PQMixin:
    if isinstance(mod, nn.Linear):
        return PQLinear.empty_like(mod, s, k, axis)
    if isinstance(mod, nn.Conv2d):
        return PQConv2d.empty_like(mod, s, k, axis)
    raise ModelError(f"compression: {type(mod).__name__} is not Linear or Conv2d")


def compress_model(
    model: nn.Module,
    spec: Spec | str | None = "auto",
    *,
    seed: int = 0,
    backend: str = "sklearn",
    device: str | torch.device | None = None,
) -> CompressionReport:
    """Replace the layers named in ``spec`` (``{name: (s, k[, axis])}``, or ``"auto"`` = :func:`auto_spec`) by
    :class:`PQLinear` / :class:`PQConv2d` in place and report sizes and reconstruction errors.
    ``backend`` / ``device``: the k-means implementation (see :func:`product_quantize`).
    """
    layers = _resolve_spec(model, spec)
    if not layers:
        raise ModelError("compression: no layer to compress (empty spec, or no layer fits the auto rule)")
    report = CompressionReport(model_bytes_before=model_bytes(model))
    modules = dict(model.named_modules())
    for name, (s, k, axis) in layers.items():
        mod = modules[name]
        weight = mod.weight.detach()
        m, n = _layer_dims(mod)
        matrix = weight.reshape(m, n)
        quantised = matrix.t() if axis == "columns" else matrix
        codes, centers = product_quantize(quantised, s, k, seed, backend=backend, device=device)
        new = _empty_pq(mod, s, k, axis)
        new.set_quantized(codes, centers)
        if mod.bias is not None:
            with torch.no_grad():
                new.bias.copy_(mod.bias.detach())
        new.to(weight.device)
        new.train(mod.training)
        _set_module(model, name, new)
        err = relative_error(quantised, reconstruct(codes, centers, quantised.shape[1]))
        report.layers.append(
            LayerReport(
                name=name,
                kind="linear" if isinstance(mod, nn.Linear) else "conv2d",
                shape=list(weight.shape),
                m=m,
                n=n,
                s=s,
                k=new.k,
                padded_n=centers.shape[0] * s,
                factor=compression_factor(m, n, s, new.k, axis),
                bytes_before=weight.numel() * weight.element_size(),
                bytes_after=new.compressed_bytes,
                rel_error=err,
                axis=axis,
            )
        )
    report.model_bytes_after = model_bytes(model)
    return report


def apply_compression_structure(model: nn.Module, report_or_spec: CompressionReport | Mapping[str, Any]) -> nn.Module:
    """Swap the named layers of a freshly built (uncompressed) ``model`` for empty PQ layers of the
    same geometry, so that a compressed ``state_dict`` (uint8 codes) loads into it.

    Accepts a :class:`CompressionReport`, its :meth:`~CompressionReport.spec`, or its ``to_dict()``.
    A tensor owned by a submodule with ``apply_pq_structure`` (HD-CNN's stacked fine components,
    ``fine.<layer>.weight``) gets its code and centre buffers from that submodule.
    """
    if isinstance(report_or_spec, CompressionReport):
        spec: Mapping[str, Any] = report_or_spec.spec()
    elif "layers" in report_or_spec and isinstance(report_or_spec["layers"], list):
        spec = {r["name"]: (r["s"], r["k"], r.get("axis", "rows")) for r in report_or_spec["layers"]}
    else:
        spec = report_or_spec
    spec = dict(spec)
    modules = dict(model.named_modules())
    for name in [n for n in spec if n not in modules]:
        owned = _owner_of(model, name)
        if owned is not None:
            owner, inner = owned
            owner.apply_pq_structure(inner, *_parse_sk(name, spec.pop(name)))
    layers = _resolve_spec(model, spec) if spec else {}
    for name, (s, k, axis) in layers.items():
        mod = modules[name]
        new = _empty_pq(mod, s, k, axis)
        new.to(mod.weight.device)
        new.train(mod.training)
        _set_module(model, name, new)
    return model


def parse_layer_spec(items: list[str]) -> dict[str, LayerSpec]:
    """``["fc6=14:64", "fc7=4:256:columns"]`` -> ``{"fc6": (14, 64), "fc7": (4, 256, "columns")}``
    (command-line form; the axis is optional, ``rows`` by default)."""
    out: dict[str, LayerSpec] = {}
    for item in items:
        name, sep, sk = item.partition("=")
        parts = sk.split(":")
        try:
            if not (sep and name) or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in AXES):
                raise ValueError
            s, k = int(parts[0]), int(parts[1])
            out[name.strip()] = (s, k) if len(parts) == 2 else (s, k, parts[2])
        except ValueError as exc:
            raise ModelError(
                f"layer spec {item!r}: expected NAME=S:K or NAME=S:K:AXIS (axis rows or columns), "
                "e.g. classifier.0=4:256"
            ) from exc
    return out


def compression_of(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``{layer: [s, k]}`` spec a compressed checkpoint carries (``metadata["compression"]``), or None."""
    metadata = checkpoint.get("metadata") or {}
    spec = metadata.get("compression") if isinstance(metadata, Mapping) else None
    return dict(spec) if spec else None


def load_compressed_state(model: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """Load a compressed checkpoint into a freshly built ``model``: swap in the PQ layers named by
    ``checkpoint["metadata"]["compression"]`` (:func:`apply_compression_structure`), then load the
    state dict (uint8 codes, fp32 centres). A checkpoint without compression loads as it is.
    """
    spec = compression_of(checkpoint)
    if spec:
        apply_compression_structure(model, spec)
    model.load_state_dict(checkpoint.get("model", checkpoint))
    return model

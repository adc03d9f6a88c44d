"""HD-CNN's part of compression: the shared layers, the coarse component and the stacked fine
components quantised each on its own (METHODS.md §2.4); the generic machinery is ``coarse2fine.compress``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from coarse2fine.compress import auto_spec, compress_model, state_bytes
from coarse2fine.errors import ModelError


def compress_hdcnn(
    model: nn.Module, spec: str | dict[str, Any] = "auto", *, seed: int = 0, backend: str = "sklearn", **auto: Any
) -> dict[str, Any]:
    """Product-quantise an HD-CNN in place (METHODS.md §2.4) and return the storage accounting.

    ``spec``: ``"auto"`` (``compression.auto_spec`` for every part, with the keyword arguments
    ``auto``, e.g. ``axis="auto"``; a part with no layer big enough is left as it is),
    ``"rear"`` (the same for the coarse and fine components only: the shared layers stay fp32),
    ``"fc"`` (the auto rule, fully connected layers only) or
    ``{"shared": {...}, "coarse": {...}, "fine": {...}}`` with the layer specs
    ``{layer name: (s, k[, axis])}`` of each part (names inside that part; ``fine`` applies to every F_k).
    Shared layers and the coarse component get PQ layers. The fine components are stacked tensors:
    each stored F_k (``model.runnable``: a one-class partial set has none) is quantised as a standalone
    copy, and the codes / centres of a weight, one table per stored component, are stored in the stack
    (``FineComponents.set_quantized``), which saves them instead of the fp32 weight. ``fine_components``
    lists each one's report with its partial set ``component``.
    Bytes are those of the ``state_dict`` (what a checkpoint stores); ``rear_*``: the coarse and fine
    components together (the layers after the branch point). ``spec`` in the result names every
    quantised tensor of the whole model (``shared.*``, ``coarse.*``, ``fine.<layer>.weight``) for
    :func:`~coarse2fine.compress.apply_compression_structure`. ``backend``: the k-means
    implementation (``compression.product_quantize``).
    """
    if isinstance(spec, str) and spec not in ("auto", "rear", "fc"):
        raise ModelError(f"HD-CNN compression spec {spec!r}: expected 'auto', 'rear', 'fc' or a mapping per part")

    def part(module: nn.Module, name: str, part_seed: int) -> Any:
        if spec == "rear" and name == "shared":
            return None
        if isinstance(spec, str):
            layers = auto_spec(module, **auto)
            if spec == "fc":  # fully connected layers only (the paper's VGG setting)
                layers = {n: sk for n, sk in layers.items() if isinstance(module.get_submodule(n), nn.Linear)}
        else:
            layers = dict(spec.get(name, {}))
        return compress_model(module, layers, seed=part_seed, backend=backend) if layers else None

    before = state_bytes(model)
    rear_before = state_bytes(model.coarse) + state_bytes(model.fine)
    reports = {
        "shared_layers": part(model.shared, "shared", seed),
        "coarse_component": part(model.coarse, "coarse", seed),
    }
    full_spec: dict[str, list[Any]] = {}
    for prefix, rep in (("shared", reports["shared_layers"]), ("coarse", reports["coarse_component"])):
        if rep is not None:
            full_spec.update({f"{prefix}.{n}": sk for n, sk in rep.spec().items()})
    fine_layers = []
    quantised: dict[str, list[nn.Module]] = {}  # layer -> its PQ layer in each stored component
    for slot, k in enumerate(model.runnable):  # one-class partial sets have no component to compress
        comp = model.fine.component(slot)
        rep = part(comp, "fine", seed + 1 + k)
        if rep is None:
            continue
        fine_layers.append({"component": k, **rep.to_dict()})
        for n, m in comp.named_modules():
            if hasattr(m, "codes"):
                quantised.setdefault(n, []).append(m)
    for n, layers in quantised.items():
        s, k_eff, axis = layers[0].s, layers[0].k, layers[0].axis
        codes = torch.stack([m.codes for m in layers])
        centers = torch.stack([m.centers for m in layers])
        model.fine.set_quantized(f"{n}.weight", s, k_eff, axis, codes, centers)
        full_spec[f"fine.{n}.weight"] = [s, k_eff, axis]
    after = state_bytes(model)
    rear_after = state_bytes(model.coarse) + state_bytes(model.fine)
    return {
        "bytes_before": before,
        "bytes_after": after,
        "factor": before / max(after, 1),
        "rear_bytes_before": rear_before,
        "rear_bytes_after": rear_after,
        "rear_factor": rear_before / max(rear_after, 1),
        **{key: (rep.to_dict() if rep is not None else None) for key, rep in reports.items()},
        "fine_components": fine_layers,
        "spec": full_spec,
    }

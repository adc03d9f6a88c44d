"""What a checkpoint carries besides weights and settings: the run's data facts, typed.

``RunFacts`` is saved as ``checkpoint["metadata"]`` (plain data, loadable with ``weights_only``) and
read back strictly: an unknown or misspelt key is an error naming it, never a silent default.
Checkpoints written before this class existed stored the same keys in a flat dict, with HD-CNN's
entries (``hierarchy``, ``branch_stage``, ``block``, ``coarse_targets``) beside the data's; they load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from coarse2fine.errors import CheckpointError

_HDCNN_KEYS = ("hierarchy", "branch_stage", "block", "coarse_targets")


@dataclass(frozen=True)
class HDCNNFacts:
    """What rebuilds an HD-CNN and its loss: the hierarchy (``Hierarchy.to_dict``), where the block
    was split, the block's model name and the coarse targets t_k (METHODS.md eqs. (15)-(16))."""

    hierarchy: dict[str, Any]
    branch_stage: str
    block: str
    coarse_targets: list[float] | None = None


@dataclass(frozen=True)
class RunFacts:
    """The data a model was trained on, as the model and its eval transform need it.

    ``data_stats``: the training split's ``{"mean", "std", ...}`` (``data.compute_mean_std``).
    ``stage``: HD-CNN stage checkpoints name their stage (``block``, ``fine``), the fine component
    ``component`` and its ``partial_set``. ``compression``: the spec of a product-quantised model.
    """

    in_chans: int
    image_size: int
    data_stats: dict[str, Any]
    in_memory: bool = False
    classes: list[str] = field(default_factory=list)
    hdcnn: HDCNNFacts | None = None
    compression: dict[str, Any] | None = None
    stage: str | None = None
    component: int | None = None
    partial_set: list[int] | None = None

    @property
    def mean(self) -> list[float]:
        return list(self.data_stats["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.data_stats["std"])

    def replace(self, **changes: Any) -> RunFacts:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any, source: str = "checkpoint") -> RunFacts:
        """Strict reading of ``checkpoint["metadata"]`` (also the flat layout of older checkpoints)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: metadata must be a mapping, got {type(data).__name__}")
        data = dict(data)
        if "hierarchy" in data and "hdcnn" not in data:  # older flat layout
            data.pop("method", None)
            data["hdcnn"] = {k: data.pop(k) for k in _HDCNN_KEYS if k in data}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise CheckpointError(f"{source}: unknown metadata key(s) {unknown}; known keys: {', '.join(names)}")
        for key in ("in_chans", "image_size", "data_stats"):
            if data.get(key) is None:
                raise CheckpointError(f"{source}: metadata has no {key!r} (not written by a coarse2fine training)")
        stats = data["data_stats"]
        if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
            raise CheckpointError(f"{source}: metadata.data_stats must hold 'mean' and 'std'")
        if data.get("hdcnn") is not None:
            h = data["hdcnn"]
            missing = [k for k in ("hierarchy", "branch_stage", "block") if k not in h]
            extra = sorted(set(h) - set(_HDCNN_KEYS))
            if missing or extra or not isinstance(h, dict):
                raise CheckpointError(f"{source}: metadata.hdcnn is malformed (missing {missing}, unknown {extra})")
            data["hdcnn"] = HDCNNFacts(**h)
        data["in_chans"], data["image_size"] = int(data["in_chans"]), int(data["image_size"])
        data["in_memory"] = bool(data.get("in_memory", False))
        data["classes"] = [str(c) for c in data.get("classes") or []]
        return cls(**data)

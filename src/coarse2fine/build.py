"""From a resolved :class:`RunConfig` to datasets, loaders, model and loss (the integration layer).

Methods (``cfg.method``) are a registry of builders, so the engine never branches on them:
``plain`` (a factory model + cross-entropy), ``herbs`` and ``hdcnn``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from coarse2fine import data as D
from coarse2fine.config import RunConfig, config_from_dict
from coarse2fine.engine import CrossEntropyObjective, Objective, check_compatible, load_checkpoint
from coarse2fine.engine.checkpoint import model_state_of
from coarse2fine.errors import CheckpointError, ConfigError
from coarse2fine.models import create_model, load_pretrained_file


@dataclass
class DataBundle:
    """The three splits of a run and what is needed to feed them to a network."""

    train: Any
    val: Any
    test: Any
    classes: list[str]
    stats: dict[str, Any]  # normalisation statistics of the training split (JSON-able)
    image_size: int
    num_channels: int
    in_memory: bool
    train_transform: Any
    eval_transform: Any
    reference_hierarchy: dict[str, list[str]] | None = None

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint must carry to rebuild the eval transform without the training data."""
        return {
            "data_stats": self.stats,
            "image_size": self.image_size,
            "in_chans": self.num_channels,
            "in_memory": self.in_memory,
        }


@dataclass
class Loaders:
    train: Any
    val: Any
    test: Any


def _load_split(cfg: RunConfig, split: str) -> Any:
    d = cfg.data
    load = lambda name: D.load_dataset(
        d.name, d.root, name, label=d.label, bad_images=d.bad_images, download=d.name == "fashion_mnist"
    )
    if d.name == "folder" and split == "test" and d.root is not None:
        root = Path(d.root)
        if not (root / "test").is_dir() and (root / "val").is_dir():
            return load("val")  # ImageNet-style trees have train/ and val/: val/ is the test split
    return load(split)


def transforms_for(cfg: RunConfig, stats: dict[str, Any], image_size: int, in_memory: bool) -> tuple[Any, Any]:
    d = cfg.data
    return D.build_transforms(
        stats,
        in_memory=in_memory,
        image_size=image_size,
        train_scale=d.train_scale,
        test_scale=d.test_scale,
        pad=d.pad,
        flip=d.flip,
        color_shift=d.color_shift,
    )


def build_datasets(cfg: RunConfig) -> DataBundle:
    """Train / held-out (stratified, seeded) / test splits; statistics from the training split only."""
    d = cfg.data
    full = _load_split(cfg, "train")
    test = _load_split(cfg, "test")
    train, val = D.stratified_split(full, d.val_fraction, seed=cfg.seed)
    if d.limit_train is not None:
        n_val = max(len(full.classes) * 2, math.ceil(d.limit_train * d.val_fraction / (1 - d.val_fraction)))
        train = D.limit(train, d.limit_train, seed=cfg.seed)
        val = D.limit(val, n_val, seed=cfg.seed)
    test = D.limit(test, d.limit_test, seed=cfg.seed)
    in_memory = bool(getattr(full, "in_memory", False))
    image_size = d.image_size or int(full.default_image_size)
    stats = D.compute_mean_std(train, seed=cfg.seed)
    train_tf, eval_tf = transforms_for(cfg, stats, image_size, in_memory)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        classes=list(full.classes),
        stats=stats,
        image_size=image_size,
        num_channels=int(full.num_channels),
        in_memory=in_memory,
        train_transform=train_tf,
        eval_transform=eval_tf,
        reference_hierarchy=getattr(full, "reference_hierarchy", None),
    )


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``data.batch_size`` is the global batch: each of ``world_size`` processes gets a share."""
    if batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is not divisible by the {world_size} processes; "
            "it is the global batch, split evenly across processes"
        )
    return batch_size // world_size


def eval_loader(cfg: RunConfig, dataset: Any, transform: Any, *, rank: int = 0, world_size: int = 1) -> Any:
    """A loader that covers ``dataset`` exactly once across all processes, in order."""
    d = cfg.data
    batch = d.eval_batch_size or 2 * d.batch_size
    return D.build_loader(
        dataset,
        transform,
        batch_size=max(1, batch // world_size),
        shuffle=False,
        drop_last=False,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        workers=d.workers,
        pin_memory=cfg.train.device != "cpu",
        pad_shards=False,
    )


def build_loaders(cfg: RunConfig, bundle: DataBundle, *, rank: int = 0, world_size: int = 1) -> Loaders:
    d = cfg.data
    train = D.build_loader(
        bundle.train,
        bundle.train_transform,
        batch_size=per_rank_batch(d.batch_size, world_size),
        shuffle=True,
        drop_last=True,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        workers=d.workers,
        pin_memory=cfg.train.device != "cpu",
    )
    kw = {"rank": rank, "world_size": world_size}
    return Loaders(
        train=train,
        val=eval_loader(cfg, bundle.val, bundle.eval_transform, **kw),
        test=eval_loader(cfg, bundle.test, bundle.eval_transform, **kw),
    )


class _NativeImages(torch.utils.data.Dataset):
    """Images of a file dataset as uint8 (C, H, W) tensors at their native size (for test protocols)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return pil_to_tensor(image), int(label)


def native_loader(cfg: RunConfig, dataset: Any) -> Any:
    """Batches at native resolution for ``engine.protocols``: the in-memory uint8 batches, or lists of
    differently sized image tensors from a file dataset (the protocols resize them to each scale Q)."""
    d = cfg.data
    batch = d.eval_batch_size or 2 * d.batch_size
    if getattr(dataset, "in_memory", False):
        return D.build_loader(dataset, None, batch_size=batch, shuffle=False, drop_last=False, pad_shards=False)
    from coarse2fine.engine.protocols import collate_list

    return torch.utils.data.DataLoader(
        _NativeImages(dataset), batch_size=batch, shuffle=False, num_workers=d.workers, collate_fn=collate_list
    )


def evaluate_protocol_on(
    models: nn.Module | list[nn.Module],
    cfg: RunConfig,
    dataset: Any,
    protocol: str,
    stats: dict[str, Any],
    num_classes: int,
    *,
    scales: list[int] | None = None,
    flip: bool = True,
) -> tuple[Any, int]:
    """A VGG test protocol (SPEC 1) on ``dataset`` at native resolution, with the recipe's scales and
    the training split's mean / std ``stats`` -> (metrics, views per image and model)."""
    from coarse2fine.engine.evaluate import metrics_from_probs
    from coarse2fine.engine.protocols import evaluate_protocol

    probs, targets, views = evaluate_protocol(
        models,
        native_loader(cfg, dataset),
        protocol,
        scales=scales,
        train_scale=cfg.data.train_scale,
        test_scale=cfg.data.test_scale,
        flip=flip,
        mean=stats["mean"],
        std=stats["std"],
    )
    return metrics_from_probs(probs, targets, num_classes), views


# ---- models and losses ---------------------------------------------------------------------------


def build_backbone(cfg: RunConfig, num_classes: int, in_chans: int, *, load_files: bool = True) -> nn.Module:
    """The factory model of ``cfg.model``, with its local weights (``pretrained_file``) when asked.

    The initial weights come from ``cfg.seed`` (torch's global generator is seeded first: a fresh
    process starts it from a random seed, so the same recipe would otherwise start differently).
    """
    torch.manual_seed(cfg.seed)
    m = cfg.model
    kwargs = dict(m.kwargs)
    if m.init is not None:
        kwargs["init"] = m.init
    if cfg.data.image_size and not m.name.startswith("timm/"):
        kwargs.setdefault("input_size", cfg.data.image_size)  # our heads are sized to the training input
    model = create_model(m.name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if load_files and m.pretrained_file:
        load_pretrained_file(model, m.pretrained_file)
    if load_files and m.init_from:
        from coarse2fine.models import init_from_shallower

        ckpt = load_checkpoint(m.init_from)
        init_from_shallower(model, model_state_of(ckpt, m.init_from))
    return model


Builder = Callable[[RunConfig, int, dict[str, Any], bool], tuple[nn.Module, Objective]]


def _plain(cfg: RunConfig, num_classes: int, metadata: dict[str, Any], load_files: bool) -> tuple[nn.Module, Objective]:
    model = build_backbone(cfg, num_classes, metadata.get("in_chans", 3), load_files=load_files)
    return model, CrossEntropyObjective(cfg.train.label_smoothing)


def _herbs(cfg: RunConfig, num_classes: int, metadata: dict[str, Any], load_files: bool) -> tuple[nn.Module, Objective]:
    from coarse2fine.herbs import build_herbs

    in_chans = metadata.get("in_chans", 3)
    backbone = build_backbone(cfg, num_classes, in_chans, load_files=load_files)
    size = metadata.get("image_size") or backbone.default_input_size[-1]
    return build_herbs(backbone, num_classes, cfg.herbs, (in_chans, size, size))


def _hdcnn(cfg: RunConfig, num_classes: int, metadata: dict[str, Any], load_files: bool) -> tuple[nn.Module, Objective]:
    from coarse2fine.hdcnn import build_hdcnn_from_metadata

    return build_hdcnn_from_metadata(cfg, num_classes, metadata)


METHODS: dict[str, Builder] = {"plain": _plain, "herbs": _herbs, "hdcnn": _hdcnn}


def build_model_and_objective(
    cfg: RunConfig, num_classes: int, metadata: dict[str, Any] | None = None, *, load_files: bool = True
) -> tuple[nn.Module, Objective]:
    """Model and loss of ``cfg.method``; ``metadata`` carries what the data or a pipeline decided."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method: unknown value {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg, num_classes, dict(metadata or {}), load_files)


def build_model(cfg: RunConfig, num_classes: int, metadata: dict[str, Any] | None = None) -> nn.Module:
    return build_model_and_objective(cfg, num_classes, metadata)[0]


def build_objective(cfg: RunConfig, num_classes: int, metadata: dict[str, Any] | None = None) -> Objective:
    return build_model_and_objective(cfg, num_classes, metadata, load_files=False)[1]


# ---- trained models --------------------------------------------------------------------------------


@dataclass
class Trained:
    """A model rebuilt from a checkpoint, in eval mode, with what is needed to feed it images."""

    model: nn.Module
    cfg: RunConfig
    classes: list[str]
    checkpoint: dict[str, Any]
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    def eval_transform(self) -> Any:
        """The eval transform the model was validated with (statistics stored in the checkpoint)."""
        md = self.metadata
        if "data_stats" not in md:
            raise CheckpointError(f"checkpoint {str(self.path)!r} has no data statistics (metadata.data_stats)")
        return transforms_for(self.cfg, md["data_stats"], md["image_size"], md.get("in_memory", False))[1]


def load_trained(
    path: str | Path, *, classes: list[str] | None = None, overrides: list[str] | None = None
) -> Trained:
    """Rebuild the model of a training (or ``c2f compress``-ed) checkpoint and load its weights (``weights_only``).

    ``classes``: when given, the checkpoint's class list must equal it (CheckpointError otherwise).
    ``overrides``: ``key=value`` settings applied to the stored config (e.g. ``data.root=...``).
    """
    from coarse2fine.config import apply_overrides, to_dict
    from coarse2fine.hdcnn.compression import apply_compression_structure, compression_of

    path = Path(path)
    ckpt = load_checkpoint(path)
    for key in ("config", "classes", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {key!r}: not a coarse2fine training checkpoint")
    try:
        cfg = config_from_dict(apply_overrides(to_dict(config_from_dict(ckpt["config"])), overrides or []))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: stored config is invalid: {exc}") from exc
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    metadata = dict(ckpt.get("metadata") or {})
    saved_classes = [str(c) for c in ckpt["classes"]]
    model, _ = build_model_and_objective(cfg, len(saved_classes), metadata, load_files=False)
    spec = compression_of(ckpt)
    if spec:  # a product-quantised model: rebuild its quantised layers before loading
        apply_compression_structure(model, spec)
    check_compatible(ckpt, classes, model, path)
    model.load_state_dict(model_state_of(ckpt, path))
    model.eval()
    return Trained(model=model, cfg=cfg, classes=saved_classes, checkpoint=ckpt, path=path, metadata=metadata)

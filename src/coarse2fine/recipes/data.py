"""Datasets and loaders of a run, built from a resolved :class:`RunConfig`: the three splits, their
normalisation statistics and transforms, training / evaluation / native-resolution loaders."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from coarse2fine import data as D
from coarse2fine.config import RunConfig
from coarse2fine.engine.evaluate import metrics_from_probs
from coarse2fine.engine.protocols import collate_list, evaluate_protocol
from coarse2fine.errors import ConfigError
from coarse2fine.facts import RunFacts


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

    def facts(self) -> RunFacts:
        """What a checkpoint must carry to rebuild the model and its eval transform without the data."""
        return RunFacts(
            in_chans=self.num_channels,
            image_size=self.image_size,
            data_stats=self.stats,
            in_memory=self.in_memory,
            classes=list(self.classes),
        )


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
        auto_augment=d.auto_augment,
        auto_augment_magnitude=d.auto_augment_magnitude,
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
        fits = max(1, batch_size // world_size) * world_size
        raise ConfigError(
            f"data.batch_size={batch_size} is not divisible by the {world_size} processes; it is the global "
            f"batch, split evenly across processes: e.g. --set data.batch_size={fits}"
        )
    return batch_size // world_size


def _loader(
    cfg: RunConfig, dataset: Any, transform: Any, batch_size: int, *, train: bool, rank: int, world_size: int
) -> Any:
    """Training loaders shuffle and drop the last partial batch; evaluation loaders cover the split once."""
    return D.build_loader(
        dataset,
        transform,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        workers=cfg.data.workers,
        pin_memory=cfg.train.device != "cpu",
        pad_shards=train,
    )


def eval_loader(cfg: RunConfig, dataset: Any, transform: Any, *, rank: int = 0, world_size: int = 1) -> Any:
    """A loader that covers ``dataset`` exactly once across all processes, in order."""
    batch = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    return _loader(cfg, dataset, transform, max(1, batch // world_size), train=False, rank=rank, world_size=world_size)


def build_loaders(cfg: RunConfig, bundle: DataBundle, *, rank: int = 0, world_size: int = 1) -> Loaders:
    batch = per_rank_batch(cfg.data.batch_size, world_size)
    kw = {"rank": rank, "world_size": world_size}
    return Loaders(
        train=_loader(cfg, bundle.train, bundle.train_transform, batch, train=True, **kw),
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
    """A VGG test protocol (METHODS.md §1) on ``dataset`` at native resolution, with the recipe's scales and
    the training split's mean / std ``stats`` -> (metrics, views per image and model)."""
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



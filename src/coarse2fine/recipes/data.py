"""Datasets and loaders of a run, built from a resolved :class:`RunConfig`: the three splits (a folder
tree's test split carved or read from a split file), the one input size, the image cache of small-image
folders, normalisation statistics and transforms, training / evaluation / native-resolution loaders."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from coarse2fine import data as D
from coarse2fine.config import RunConfig
from coarse2fine.data.device_decode import DeviceDecodeLoader, DeviceTransform, device_transforms
from coarse2fine.engine.checkpoint import atomic_write_text
from coarse2fine.engine.evaluate import metrics_from_probs, resolve_device
from coarse2fine.engine.protocols import collate_list, evaluate_protocol
from coarse2fine.errors import ConfigError, DataError
from coarse2fine.facts import RunFacts
from coarse2fine.models import default_input_size, pretrained_normalization

log = logging.getLogger(__name__)

SPLIT_CSV = "split.csv"  # in a run folder: the train / test file lists a folder run used


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
    in_memory: bool  # small images: BatchAugment (pad, crop, flip), a batch at a time when held in memory
    train_transform: Any
    eval_transform: Any
    reference_hierarchy: dict[str, list[str]] | None = None
    split: D.SplitList | None = None  # a folder tree's carved or given test split: <run>/split.csv

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
    options = {"follow_external_links": d.follow_external_links} if d.name == "folder" else {}
    load = lambda name: D.load_dataset(
        d.name, d.root, name, label=d.label, bad_images=d.bad_images, download=d.name == "fashion_mnist", **options
    )
    if d.name == "folder" and split == "test" and d.root is not None:
        root = Path(d.root).expanduser()
        if not (root / "test").is_dir() and (root / "val").is_dir():
            return load("val")  # ImageNet-style trees have train/ and val/: val/ is the test split
    return load(split)


def fixed_split(cfg: RunConfig, run_dir: str | Path | None = None) -> D.SplitList | None:
    """The train / test file lists of a folder tree (METHODS.md §4): ``<run_dir>/split.csv`` when that run
    saved one, else ``data.split_file``, else carved with ``data.test_fraction`` (stratified, seeded by
    ``seed``) from a tree without ``test/`` or ``val/``; None when the tree's own folders give the splits."""
    d = cfg.data
    if d.name != "folder" or (d.test_fraction is None and d.split_file is None):
        return None
    if d.root is None:
        raise ConfigError(
            "data.root: the folder dataset needs a root, the folder holding one subfolder per class "
            "(--set data.root=/path/to/photos)"
        )
    root = Path(d.root).expanduser()
    links = D.LinkPolicy(root, d.follow_external_links)
    saved = Path(run_dir) / SPLIT_CSV if run_dir is not None else None
    file = saved if saved is not None and saved.is_file() else d.split_file
    if file == d.split_file and file is not None and not Path(file).expanduser().is_file():
        raise DataError(f"data.split_file={file!r}: the split file does not exist")
    if file is not None:
        return D.read_split_file(Path(file).expanduser(), root, D.folder_classes(root, links), links)
    if any((root / s).is_dir() for s in ("val", "test")):
        log.warning("data.test_fraction=%g not used: %s has its own test split folder", d.test_fraction, root)
        return None
    full = D.ImageFolderDataset(root, "train", bad_images=d.bad_images, follow_external_links=d.follow_external_links)
    assert d.test_fraction is not None
    test = D.carve_test(full.targets, full.classes, d.test_fraction, seed=cfg.seed, source=str(full.split_dir))
    return D.SplitList.from_files(root, full.paths, full.targets, test, full.classes)


def _split_datasets(cfg: RunConfig, split: D.SplitList) -> tuple[Any, Any]:
    files = split.absolute()

    def part(mask: np.ndarray, name: str) -> Any:
        idx = np.flatnonzero(mask)
        return D.ImageFileDataset(
            [files[i] for i in idx], split.labels[idx], split.classes,
            source=f"{split.root} ({name} split)", bad_images=cfg.data.bad_images,
        )  # fmt: skip

    return part(~split.test, "train"), part(split.test, "test")


def _side(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return int(value[0])
    raise ConfigError(f"{key}={value!r}: give one side in pixels (inputs are square)")


def resolve_image_size(cfg: RunConfig, native: int | None, in_chans: int) -> int:
    """The one input size of a run, for the model and the transforms: ``data.image_size``; else the size
    ``model.kwargs`` builds the model for; else the data's own (``native``: a small-image dataset); else
    the model's default input size. ``data.image_size`` and a different size in ``model.kwargs`` are a
    ConfigError naming both keys."""
    d, m = cfg.data, cfg.model
    key = "img_size" if m.name.startswith("timm/") else "input_size"
    pinned = _side(m.kwargs.get(key), f"model.kwargs.{key}")
    if d.image_size is not None:
        if pinned is not None and pinned != d.image_size:
            raise ConfigError(
                f"data.image_size={d.image_size} but model.kwargs.{key}={m.kwargs[key]!r} builds {m.name} for "
                f"{pinned} px inputs; make them agree: --set data.image_size={pinned}, or "
                f"--set model.kwargs.{key}={d.image_size} (or drop model.kwargs.{key})"
            )
        return d.image_size
    if pinned is not None:
        return pinned
    if native is not None:
        return native
    size = default_input_size(m.name, in_chans, **{k: v for k, v in m.kwargs.items() if k != "init"})
    if size is None:
        raise ConfigError(f"model {m.name!r} declares no default_input_size; set data.image_size")
    return size[1]


def _uniform_size(cfg: RunConfig, train: Any, test: Any) -> tuple[int, int] | None:
    """(W, H) shared by every image of a folder dataset's splits (file headers of a sample), else None."""
    if cfg.data.name != "folder" or getattr(train, "in_memory", False):
        return None
    sizes = {D.common_image_size(ds.paths) for ds in (train, test)}
    return sizes.pop() if len(sizes) == 1 else None


def _cached(cfg: RunConfig, train: Any, test: Any, size: tuple[int, int], progress: bool) -> tuple[Any, Any] | None:
    """Both splits decoded into (or read from) the image cache; None when an image has another size."""
    d = cfg.data
    out = []
    for ds in (train, test):
        mem = D.cached_images(
            ds, size, cache_dir=d.cache_dir, workers=d.workers, progress=progress, strict=d.cache == "on"
        )
        if mem is None:
            return None
        out.append(mem)
    return out[0], out[1]


def _sources(cfg: RunConfig, run_dir: str | Path | None, progress: bool) -> tuple[Any, Any, Any, int, bool]:
    """(train, test, split list, image size, small-image pipeline): images cached when asked, the size resolved."""
    d = cfg.data
    split = fixed_split(cfg, run_dir)
    if split is not None:
        full, test = _split_datasets(cfg, split)
    else:
        full, test = _load_split(cfg, "train"), _load_split(cfg, "test")
    uniform = _uniform_size(cfg, full, test)
    small = uniform is not None and uniform[0] == uniform[1] and uniform[0] <= D.SMALL_IMAGE
    if getattr(full, "in_memory", False):
        native: int | None = int(full.default_image_size)
    else:
        native = uniform[0] if small and uniform is not None else None
    image_size = resolve_image_size(cfg, native, int(full.num_channels))
    if d.name == "folder" and d.cache == "on" and uniform is None:
        raise DataError(
            f"data.cache=on: the images of {d.root} do not all have one size (read from a sample of file "
            "headers); use data.cache=auto or off"
        )
    if uniform is not None and (d.cache == "on" or (d.cache == "auto" and small)):
        cached = _cached(cfg, full, test, uniform, progress)
        if cached is not None:
            full, test = cached
    return full, test, split, image_size, bool(getattr(full, "in_memory", False)) or small


def normalization(cfg: RunConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with the mean/std ``data.normalize`` picks: a pretrained model's own (timm's
    ``pretrained_cfg``, as timm fine-tunes; averaged over RGB for one-channel images), else the training
    split's. The colour-shift eigen-decomposition stays the training split's."""
    d, m = cfg.data, cfg.model
    if d.normalize == "dataset" or m.pretrained is False:
        return stats
    found = pretrained_normalization(m.name, m.pretrained)
    channels = len(stats["mean"])
    if found is not None and channels == 1 and len(found[0]) == 3:
        found = [sum(found[0]) / 3], [sum(found[1]) / 3]
    if found is None or len(found[0]) != channels:
        what = "give none" if found is None else f"are for {len(found[0])} channels, the images have {channels}"
        if d.normalize == "pretrained":
            raise ConfigError(f"data.normalize=pretrained: the statistics of weights {m.pretrained!r} {what}")
        log.info("normalising with the training split's statistics: those of the pretrained weights %s", what)
        return stats
    return {**stats, "mean": found[0], "std": found[1], "normalize": f"pretrained weights of {m.name}"}


# the data.* settings that are build_transforms' keyword arguments of the same name
TRANSFORM_SETTINGS = (
    "train_scale", "test_scale", "pad", "flip", "color_shift", "auto_augment", "auto_augment_magnitude"
)


def transforms_for(cfg: RunConfig, stats: dict[str, Any], image_size: int, in_memory: bool) -> tuple[Any, Any]:
    """(train, eval) transforms of the run's data settings (``data.build_transforms``); for file datasets
    with ``data.decode_device: cuda``, the same pipeline as device transforms (``data.device_decode``)."""
    d = cfg.data
    if d.decode_device == "cuda" and not in_memory:
        return device_transforms(
            stats,
            image_size=image_size,
            train_scale=d.train_scale,
            test_scale=d.test_scale,
            flip=d.flip,
            color_shift=d.color_shift,
        )
    settings = {key: getattr(cfg.data, key) for key in TRANSFORM_SETTINGS}
    return D.build_transforms(stats, in_memory=in_memory, image_size=image_size, **settings)


def build_datasets(cfg: RunConfig, *, run_dir: str | Path | None = None, progress: bool = False) -> DataBundle:
    """Train / held-out (stratified, seeded) / test splits; statistics from the training split only.

    ``run_dir``: a run folder whose ``split.csv`` (if any) fixes a folder tree's test split. The input
    size is resolved here, once (:func:`resolve_image_size`); small-image folder datasets are decoded into
    the image cache (``data.cache``; ``progress`` shows the first decoding).
    """
    d = cfg.data
    full, test, split, image_size, small = _sources(cfg, run_dir, progress)
    train, val = D.stratified_split(full, d.val_fraction, seed=cfg.seed)
    if d.limit_train is not None:
        n_val = max(len(full.classes) * 2, math.ceil(d.limit_train * d.val_fraction / (1 - d.val_fraction)))
        train = D.limit(train, d.limit_train, seed=cfg.seed)
        val = D.limit(val, n_val, seed=cfg.seed)
    test = D.limit(test, d.limit_test, seed=cfg.seed)
    stats = normalization(cfg, D.compute_mean_std(train, seed=cfg.seed))
    train_tf, eval_tf = transforms_for(cfg, stats, image_size, small)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        classes=list(full.classes),
        stats=stats,
        image_size=image_size,
        num_channels=int(full.num_channels),
        in_memory=small,
        train_transform=train_tf,
        eval_transform=eval_tf,
        reference_hierarchy=getattr(full, "reference_hierarchy", None),
        split=split,
    )


def save_split(bundle: DataBundle, run_dir: str | Path) -> Path | None:
    """``<run_dir>/split.csv`` (path,label,split) of a carved or given split, written atomically."""
    if bundle.split is None:
        return None
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(run_dir) / SPLIT_CSV, bundle.split.to_csv())


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
    """Training loaders shuffle and drop the last partial batch; evaluation loaders cover the split once.
    A device transform (``data.decode_device: cuda``) gets a loader whose workers read bytes and whose
    batches are decoded and transformed on the training device."""
    common: dict[str, Any] = dict(batch_size=batch_size, shuffle=train, drop_last=train, seed=cfg.seed, rank=rank)
    common.update(world_size=world_size, workers=cfg.data.workers, pad_shards=train)
    if isinstance(transform, DeviceTransform):
        return DeviceDecodeLoader(dataset, transform, device=resolve_device(cfg.train.device), **common)
    return D.build_loader(dataset, transform, pin_memory=cfg.train.device != "cpu", **common)


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



"""``load_dataset(name, ...)``: one entry point for every dataset the system reads (METHODS.md §4)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from coarse2fine.config import quote
from coarse2fine.data.cifar import CIFAR10, CIFAR100
from coarse2fine.data.cub import CUB200
from coarse2fine.data.fashion_mnist import FashionMNIST
from coarse2fine.data.folder import ImageFolderDataset
from coarse2fine.data.nabirds import NABirds
from coarse2fine.errors import ConfigError

Root = str | os.PathLike[str] | None


def _fashion_mnist(root: Root, split: str, download: bool, **kw: Any) -> Any:
    return FashionMNIST(root, split, download=download)


def _cifar100(root: Root, split: str, download: bool, label: str = "fine", **kw: Any) -> Any:
    return CIFAR100(root, split, label=label, download=download)


def _cifar10(root: Root, split: str, download: bool, **kw: Any) -> Any:
    return CIFAR10(root, split, download=download)


def _cub(root: Root, split: str, download: bool, **kw: Any) -> Any:
    return CUB200(root, split, **kw)


def _nabirds(root: Root, split: str, download: bool, **kw: Any) -> Any:
    return NABirds(root, split, **kw)


def _folder(root: Root, split: str, download: bool, **kw: Any) -> Any:
    return ImageFolderDataset(root, split, **kw)


# name -> (factory, in memory, accepts bad_images / file options)
DATASETS: dict[str, tuple[Callable[..., Any], bool]] = {
    "fashion_mnist": (_fashion_mnist, True),
    "cifar100": (_cifar100, True),
    "cifar10": (_cifar10, True),
    "cub": (_cub, False),
    "nabirds": (_nabirds, False),
    "folder": (_folder, False),
}


def load_dataset(
    name: str,
    root: Root = None,
    split: str = "train",
    *,
    label: str = "fine",
    bad_images: str = "error",
    download: bool = False,
    **options: Any,
) -> Any:
    """The ``split`` of dataset ``name`` (one of :data:`DATASETS`).

    ``label="coarse"`` exists for ``cifar100`` only; ``bad_images`` (``error | skip``) applies to file
    datasets; ``download`` to Fashion-MNIST and CIFAR. ``options`` go to file datasets (``mode="L"``,
    ``alpha="drop"``; ``level`` for NABirds' reference hierarchy).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {quote(name)}; choose one of {', '.join(DATASETS)}")
    factory, in_memory = DATASETS[name]
    if label != "fine" and name != "cifar100":
        raise ConfigError(f"label={quote(label)}: only cifar100 has coarse labels; dataset {name!r} has 'fine' only")
    if in_memory:
        if options:
            raise ConfigError(f"dataset {name!r} takes no option(s) {', '.join(sorted(options))}")
        return factory(root, split, download, label=label)
    return factory(root, split, download, bad_images=bad_images, **options)

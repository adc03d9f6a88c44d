"""Datasets, splits, transforms and loaders (METHODS.md §4; the data contract in docs/ARCHITECTURE.md).

Imports nothing of ours except :mod:`coarse2fine.errors`.
"""

from coarse2fine.data.base import (
    IMG_EXTENSIONS,
    DatasetView,
    ImageFileDataset,
    InMemoryDataset,
    LocalLabelView,
    Skipped,
    class_counts,
    convert_mode,
    load_image,
    subset,
)
from coarse2fine.data.cache import CACHE_MODES, SMALL_IMAGE, cached_images, default_cache_dir
from coarse2fine.data.cifar import CIFAR10, CIFAR100, RestrictedUnpickler, safe_load_pickle
from coarse2fine.data.cub import CUB200
from coarse2fine.data.fashion_mnist import FashionMNIST
from coarse2fine.data.filelist import SplitList, read_split_file
from coarse2fine.data.folder import ImageFolderDataset, LinkPolicy, common_image_size, folder_classes, scan_images
from coarse2fine.data.idx import read_idx, write_idx
from coarse2fine.data.loader import FileLoader, InMemoryLoader, build_loader, shard_indices
from coarse2fine.data.nabirds import NABirds
from coarse2fine.data.registry import DATASETS, load_dataset
from coarse2fine.data.split import carve_test, limit, stratified_split
from coarse2fine.data.transforms import (
    BatchAugment,
    ImageTransform,
    PCAColorShift,
    PerImage,
    build_transforms,
    compute_mean_std,
    eval_scale,
    large_eval_transform,
    large_train_transform,
)

__all__ = [
    "CACHE_MODES",
    "CIFAR10",
    "CIFAR100",
    "CUB200",
    "DATASETS",
    "IMG_EXTENSIONS",
    "SMALL_IMAGE",
    "BatchAugment",
    "DatasetView",
    "FashionMNIST",
    "FileLoader",
    "ImageFileDataset",
    "ImageFolderDataset",
    "ImageTransform",
    "InMemoryDataset",
    "InMemoryLoader",
    "LinkPolicy",
    "LocalLabelView",
    "NABirds",
    "PCAColorShift",
    "PerImage",
    "RestrictedUnpickler",
    "Skipped",
    "SplitList",
    "build_loader",
    "build_transforms",
    "cached_images",
    "carve_test",
    "class_counts",
    "common_image_size",
    "compute_mean_std",
    "convert_mode",
    "default_cache_dir",
    "eval_scale",
    "folder_classes",
    "large_eval_transform",
    "large_train_transform",
    "limit",
    "load_dataset",
    "load_image",
    "read_idx",
    "read_split_file",
    "safe_load_pickle",
    "scan_images",
    "shard_indices",
    "stratified_split",
    "subset",
    "write_idx",
]

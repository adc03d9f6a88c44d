"""Fashion-MNIST from its four IDX files, gzipped or plain (METHODS.md §4; the default dataset).

Search order: the given root, ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``), ``./data/fashion-mnist``. With ``download=True`` the official files are fetched
(MD5-checked, torchvision utilities) into the given root or ``./data/fashion-mnist``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from coarse2fine.data.base import InMemoryDataset, check_choice
from coarse2fine.data.idx import read_idx
from coarse2fine.data.locate import candidate_roots, download_files, find_root
from coarse2fine.errors import DataError

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_ROOTS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"), Path("data/fashion-mnist"))
DOWNLOAD_ROOT = Path("data/fashion-mnist")
MIRRORS = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
RESOURCES = [
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
]
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_split(split: str) -> Callable[[Path], bool]:
    return lambda folder: all(_file(folder, stem) is not None for stem in SPLIT_FILES[split])


def _missing_message(split: str, searched: list[Path], failure: str | None) -> str:
    files = ", ".join(name for name, _ in RESOURCES)
    where = ", ".join(str(p) for p in searched)
    msg = f"Fashion-MNIST {split} files not found (looked in: {where})."
    if failure:
        msg += f" Download failed: {failure}."
    else:
        msg += " Pass download=True to fetch them."
    return (
        msg + f" Put the four files {files} (gzipped or not) into {DOWNLOAD_ROOT}/ or the folder given as root, "
        "or install them system-wide with `apt-get install dataset-fashion-mnist` "
        "(they land in /usr/share/datasets/fashion-mnist)."
    )


class FashionMNIST(InMemoryDataset):
    """Fashion-MNIST ``split`` ("train" 60k or "test" 10k) as a uint8 tensor ``(N, 1, 28, 28)``."""

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", download: bool = False):
        check_choice(split, tuple(SPLIT_FILES), "split")
        searched = candidate_roots(root, DEFAULT_ROOTS)
        folder = find_root(searched, _has_split(split))
        if folder is None:
            if not download:
                raise DataError(_missing_message(split, searched, None))
            target = Path(root).expanduser() if root is not None else DOWNLOAD_ROOT
            try:
                download_files(target, MIRRORS, RESOURCES)
            except DataError as exc:
                raise DataError(_missing_message(split, searched, str(exc))) from None
            folder = target
        image_file, label_file = (_file(folder, stem) for stem in SPLIT_FILES[split])
        assert image_file is not None and label_file is not None
        images = read_idx(image_file)
        labels = read_idx(label_file)
        if images.ndim != 3 or images.dtype.name != "uint8":
            raise DataError(f"{image_file}: expected uint8 images (N, H, W), got {images.dtype.name} {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{label_file}: expected a 1-D label array, got shape {labels.shape}")
        if len(labels) != len(images):
            raise DataError(f"{label_file}: {len(labels)} labels for {len(images)} images in {image_file}")
        self.root = folder
        super().__init__(torch.from_numpy(images).unsqueeze(1), labels, CLASSES, source=str(label_file))

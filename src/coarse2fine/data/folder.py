"""Class-per-folder image tree, ImageNet style (METHODS.md §4).

``root/<class>/**/<image>``; or, when ``root`` has ``train/``, ``val/`` or ``test/`` subfolders,
``root/<split>/<class>/**/<image>``. Classes are the sorted class folders (of ``train/`` when the tree is
split, so labels agree across splits). Files whose extension is not an image extension are ignored;
hidden files and folders too. Bad images follow the ``error | skip`` policy of
:class:`~coarse2fine.data.base.ImageFileDataset`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from coarse2fine.data.base import IMG_EXTENSIONS, ImageFileDataset, PathTable
from coarse2fine.errors import ConfigError, DataError

SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _check_duplicates(classes: list[str], folder: Path) -> None:
    """Class folders whose names differ only in case or surrounding spaces would merge on other systems."""
    seen: dict[str, str] = {}
    for name in classes:
        key = name.strip().casefold()
        if key in seen:
            raise DataError(f"{folder}: class folders {seen[key]!r} and {name!r} differ only in case or spaces")
        seen[key] = name


def scan_images(folder: Path, extensions: tuple[str, ...]) -> tuple[list[str], int]:
    """Image files under ``folder`` (recursive, sorted, following symlinks but visiting each real folder
    once) and how many other files were ignored."""
    files, ignored = [], 0
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in visited:  # a symlinked folder seen before (or a symlink cycle)
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(extensions):
                files.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    return files, ignored


class ImageFolderDataset(ImageFileDataset):
    """Images of a class-per-folder tree; ``mode="L"`` for a grayscale dataset.

    Raises DataError for a missing root or split folder, no class folders, an empty class folder
    (unless ``allow_empty``; empty classes are always allowed in ``val/`` and ``test/``), a class in a
    split that ``train/`` does not have, and class names that collide.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        split: str = "train",
        *,
        mode: str = "RGB",
        bad_images: str = "error",
        alpha: str = "white",
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
        allow_empty: bool = False,
        default_image_size: int = 224,
    ) -> None:
        if root is None:
            raise ConfigError("the folder dataset needs a root: the folder holding one subfolder per class")
        if split not in SPLIT_DIRS:
            raise ConfigError(f"split={split!r} is not valid; choose one of {', '.join(SPLIT_DIRS)}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: image folder does not exist")
        extensions = tuple(e.lower() for e in extensions)
        present = [s for s in SPLIT_DIRS if (root / s).is_dir()]
        if present:
            folder = root / split
            if split not in present:
                raise DataError(f"{root}: has split folders {', '.join(present)}/ but no {split}/")
            class_root = root / "train" if "train" in present else folder
        elif split != "train":
            raise DataError(
                f"{root}: a flat class-per-folder tree holds only the training split; "
                f"make {root}/train/ and {root}/{split}/ to give a {split} split"
            )
        else:
            folder = class_root = root
        classes = _class_dirs(class_root)
        if not classes:
            raise DataError(f"{class_root}: no class folders (expected {class_root}/<class name>/<images>)")
        _check_duplicates(classes, class_root)
        if folder != class_root:
            extra = sorted(set(_class_dirs(folder)) - set(classes))
            if extra:
                raise DataError(f"{folder}: class folder(s) {', '.join(extra)} are not in {class_root}")
        counts: list[int] = []

        def listing() -> Iterator[str]:  # one class folder at a time, straight into the packed table
            for name in classes:
                files, ignored = scan_images(folder / name, extensions) if (folder / name).is_dir() else ([], 0)
                if not files and not allow_empty and folder == class_root:
                    other = (
                        f" ({ignored} file(s) without an image extension {', '.join(extensions)})" if ignored else ""
                    )
                    raise DataError(f"{folder / name}: class folder has no images{other}")
                counts.append(len(files))
                yield from files

        paths = PathTable(listing())
        targets = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
        self.root = root
        self.split_dir = folder
        super().__init__(
            paths,
            targets,
            classes,
            source=str(folder),
            mode=mode,
            bad_images=bad_images,
            alpha=alpha,
            default_image_size=default_image_size,
        )

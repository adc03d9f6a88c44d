"""Class-per-folder image tree, ImageNet style (METHODS.md §4).

``root/<class>/**/<image>``; or, when ``root`` has ``train/``, ``val/`` or ``test/`` subfolders,
``root/<split>/<class>/**/<image>``. Classes are the sorted class folders (of ``train/`` when the tree is
split, so labels agree across splits). Files whose extension is not an image extension are ignored;
hidden files and folders too. Bad images follow the ``error | skip`` policy of
:class:`~coarse2fine.data.base.ImageFileDataset`.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from coarse2fine.data.base import IMG_EXTENSIONS, ImageFileDataset, PathTable
from coarse2fine.errors import ConfigError, DataError

SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_names(folder: Path) -> dict[str, str]:
    """Class name (NFC-normalised) -> its folder's name on disk. Names that would merge elsewhere (the
    same after NFC, case folding and stripping spaces: ``café`` composed and decomposed) are an error."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in _class_dirs(folder):
        key = unicodedata.normalize("NFC", name).strip().casefold()
        if key in seen:
            raise DataError(
                f"{folder}: class folders {seen[key]!r} and {name!r} differ only in Unicode normalisation, case "
                "or spaces (they look alike); rename one of them"
            )
        seen[key] = name
        out[unicodedata.normalize("NFC", name)] = name
    return dict(sorted(out.items()))


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
        on_disk = _class_names(class_root)
        classes = list(on_disk)
        if not classes:
            raise DataError(f"{class_root}: no class folders (expected {class_root}/<class name>/<images>)")
        if folder != class_root:
            on_disk = _class_names(folder)
            extra = sorted(set(on_disk) - set(classes))
            if extra:
                raise DataError(f"{folder}: class folder(s) {', '.join(extra)} are not in {class_root}")
        counts: list[int] = []

        def listing() -> Iterator[str]:  # one class folder at a time, straight into the packed table
            for name in classes:
                path = folder / on_disk.get(name, name)
                files, ignored = scan_images(path, extensions) if path.is_dir() else ([], 0)
                if not files and not allow_empty and folder == class_root:
                    other = (
                        f" ({ignored} file(s) without an image extension {', '.join(extensions)})" if ignored else ""
                    )
                    raise DataError(f"{path}: class folder has no images{other}")
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

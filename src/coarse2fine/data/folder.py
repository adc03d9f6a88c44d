"""Class-per-folder image tree, ImageNet style (METHODS.md §4).

``root/<class>/**/<image>``; or, when ``root`` has ``train/``, ``val/`` or ``test/`` subfolders,
``root/<split>/<class>/**/<image>``. Classes are the sorted class folders (of ``train/`` when the tree is
split, so labels agree across splits). Files whose extension is not an image extension are ignored;
hidden files and folders too. Bad images follow the ``error | skip`` policy of
:class:`~coarse2fine.data.base.ImageFileDataset`. Symbolic links are followed while their target stays
under ``root``; one leading out of it is refused unless ``follow_external_links`` (:class:`LinkPolicy`).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from coarse2fine.data.base import IMG_EXTENSIONS, ImageFileDataset, PathTable
from coarse2fine.errors import ConfigError, DataError

SPLIT_DIRS = ("train", "val", "test")


class LinkPolicy:
    """Symbolic links under ``root``: those whose target lies outside it are refused (DataError naming the
    link and its target) unless ``follow_external``; links inside the root are always followed."""

    def __init__(self, root: str | os.PathLike[str], follow_external: bool = False) -> None:
        self.root = os.path.realpath(root)
        self.follow_external = follow_external

    def inside(self, path: str | os.PathLike[str]) -> bool:
        target = os.path.realpath(path)
        return target == self.root or target.startswith(self.root.rstrip(os.sep) + os.sep)

    def check(self, link: str | os.PathLike[str]) -> None:
        if not self.follow_external and not self.inside(link):
            raise DataError(
                f"{link}: symbolic link to {os.path.realpath(link)} leads outside the data root {self.root}; "
                "move the data inside it, or set data.follow_external_links: true to follow such links"
            )


def _class_dirs(folder: Path, links: LinkPolicy | None = None) -> list[str]:
    names = []
    for e in os.scandir(folder):
        if e.is_dir() and not e.name.startswith("."):
            if links is not None and e.is_symlink():
                links.check(e.path)
            names.append(e.name)
    return sorted(names)


def _class_names(folder: Path, links: LinkPolicy | None = None) -> dict[str, str]:
    """Class name (NFC-normalised) -> its folder's name on disk. Names that would merge elsewhere (the
    same after NFC, case folding and stripping spaces: ``café`` composed and decomposed) are an error."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in _class_dirs(folder, links):
        key = unicodedata.normalize("NFC", name).strip().casefold()
        if key in seen:
            raise DataError(
                f"{folder}: class folders {seen[key]!r} and {name!r} differ only in Unicode normalisation, case "
                "or spaces (they look alike); rename one of them"
            )
        seen[key] = name
        out[unicodedata.normalize("NFC", name)] = name
    return dict(sorted(out.items()))


def scan_images(folder: Path, extensions: tuple[str, ...], links: LinkPolicy | None = None) -> tuple[list[str], int]:
    """Image files under ``folder`` (recursive, sorted, each folder's files before its subfolders; symlinks
    followed under ``links``' policy, each real folder visited once) and how many other files were ignored."""
    files: list[str] = []
    ignored = 0
    visited: set[tuple[int, int]] = set()
    stack = [os.fspath(folder)]
    while stack:
        path = stack.pop()
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in visited:  # a symlinked folder seen before (or a symlink cycle)
            continue
        visited.add((st.st_dev, st.st_ino))
        with os.scandir(path) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if links is not None and e.is_symlink():
                links.check(e.path)
            if e.is_dir():
                subdirs.append(e.path)
            elif e.name.lower().endswith(extensions):
                files.append(e.path)
            else:
                ignored += 1
        stack.extend(reversed(subdirs))
    return files, ignored


def folder_classes(root: str | os.PathLike[str], links: LinkPolicy | None = None) -> list[str]:
    """The class names of a tree (of ``root/train/`` when it has one), without listing any image."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    base = root / "train" if (root / "train").is_dir() else root
    classes = list(_class_names(base, links))
    if not classes:
        raise DataError(f"{base}: no class folders (expected {base}/<class name>/<images>)")
    return classes


def common_image_size(paths: Sequence[str], *, probe: int = 256) -> tuple[int, int] | None:
    """The (width, height) shared by the images of ``paths``, read from file headers (nothing decoded).

    Up to ``probe`` files spread evenly over the list are read (all of them in a smaller list); None at the
    first size that differs. Unreadable files are passed over (the bad-image policy meets them later).
    """
    n = len(paths)
    picks = np.unique(np.linspace(0, n - 1, num=min(n, probe)).round().astype(np.int64)) if n else []
    size = None
    for i in picks:
        try:
            with Image.open(paths[int(i)]) as img:
                current = img.size
        except (OSError, ValueError, SyntaxError):
            continue
        if size is None:
            size = current
        elif current != size:
            return None
    return size


class ImageFolderDataset(ImageFileDataset):
    """Images of a class-per-folder tree; ``mode="L"`` for a grayscale dataset.

    Raises DataError for a missing root or split folder, no class folders, an empty class folder
    (unless ``allow_empty``; empty classes are always allowed in ``val/`` and ``test/``), a class in a
    split that ``train/`` does not have, class names that collide, and a symbolic link leading out of
    ``root`` (unless ``follow_external_links``).
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
        follow_external_links: bool = False,
    ) -> None:
        if root is None:
            raise ConfigError("the folder dataset needs a root: the folder holding one subfolder per class")
        if split not in SPLIT_DIRS:
            raise ConfigError(f"split={split!r} is not valid; choose one of {', '.join(SPLIT_DIRS)}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: image folder does not exist")
        extensions = tuple(e.lower() for e in extensions)
        links = LinkPolicy(root, follow_external_links)
        present = [s for s in SPLIT_DIRS if (root / s).is_dir()]
        for s in present:
            if (root / s).is_symlink():
                links.check(root / s)
        if present:
            folder = root / split
            if split not in present:
                raise DataError(f"{root}: has split folders {', '.join(present)}/ but no {split}/")
            class_root = root / "train" if "train" in present else folder
        elif split != "train":
            raise DataError(
                f"{root}: a flat class-per-folder tree holds only the training split; set data.test_fraction "
                f"(e.g. 0.1) to hold out a stratified test part, give data.split_file, or make {root}/train/ "
                f"and {root}/{split}/"
            )
        else:
            folder = class_root = root
        on_disk = _class_names(class_root, links)
        classes = list(on_disk)
        if not classes:
            raise DataError(f"{class_root}: no class folders (expected {class_root}/<class name>/<images>)")
        if folder != class_root:
            on_disk = _class_names(folder, links)
            extra = sorted(set(on_disk) - set(classes))
            if extra:
                raise DataError(f"{folder}: class folder(s) {', '.join(extra)} are not in {class_root}")
        counts: list[int] = []

        def listing() -> Iterator[str]:  # one class folder at a time, straight into the packed table
            for name in classes:
                path = folder / on_disk.get(name, name)
                files, ignored = scan_images(path, extensions, links) if path.is_dir() else ([], 0)
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

"""CUB-200-2011 (and the shared reader of its text files, used by NABirds too) (METHODS.md §4).

Files (in ``root`` or ``root/CUB_200_2011``): ``images.txt`` (``<image id> <relative path>``),
``image_class_labels.txt`` (``<image id> <class id>``), ``train_test_split.txt`` (``<image id> <1 = train>``),
``classes.txt`` (``<class id> <name>``) and ``images/``. The official split is used; optional files
(bounding boxes, parts, attributes) are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from coarse2fine.data.base import ImageFileDataset, check_choice
from coarse2fine.data.locate import candidate_roots, find_root
from coarse2fine.errors import DataError

LIST_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def read_table(path: Path, *, split_once: bool = True) -> list[tuple[str, str]]:
    """Lines ``<key> <value>`` of a dataset list file; the value may hold spaces. Keys must be unique."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
        key, value = parts[0], parts[1].strip()
        if key in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = lineno
        rows.append((key, value))
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}: {what} {value!r} is not an integer") from None


def read_image_lists(folder: Path) -> tuple[dict[str, str], dict[str, int], dict[str, bool]]:
    """``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``: path, class id and is-train
    per image id; every image id must appear in all three files."""
    images = dict(read_table(folder / "images.txt"))
    labels_path, split_path = folder / "image_class_labels.txt", folder / "train_test_split.txt"
    labels = {k: _int(v, labels_path, f"class id of image {k}") for k, v in read_table(labels_path)}
    flags = {}
    for k, v in read_table(split_path):
        if v not in ("0", "1"):
            raise DataError(f"{split_path}: is_training_image of image {k} must be 0 or 1, got {v!r}")
        flags[k] = v == "1"
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", flags)):
        missing = [k for k in images if k not in table]
        extra = [k for k in table if k not in images]
        if missing or extra:
            detail = f"no entry for image id(s) {missing[:5]}" if missing else f"unknown image id(s) {extra[:5]}"
            raise DataError(f"{folder / name}: {detail} (images.txt lists {len(images)} images)")
    return images, labels, flags


def clean_class_name(raw: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return re.sub(r"^\d+\.", "", raw).replace("_", " ").strip()


def find_list_folder(
    root: str | os.PathLike[str] | None, defaults: Sequence[Path], subdir: str, dataset: str, hint: str = ""
) -> Path:
    """The folder (``root``, a default, or its ``subdir``) that holds the CUB-style list files."""
    searched = []
    for cand in candidate_roots(root, defaults):
        searched += [cand, cand / subdir]
    folder = find_root(searched, lambda p: all((p / f).is_file() for f in LIST_FILES))
    if folder is None:
        raise DataError(
            f"{dataset} not found (looked in: {', '.join(map(str, searched))}); the folder must hold "
            f"{', '.join(LIST_FILES)} and images/{hint}"
        )
    return folder


class CUB200(ImageFileDataset):
    """CUB-200-2011 ``split`` ("train" / "test", the official split). ``raw_classes`` keeps the raw names."""

    DEFAULT_ROOTS = (Path("data/CUB_200_2011"), Path("/usr/share/datasets/CUB_200_2011"))

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        *,
        bad_images: str = "error",
        mode: str = "RGB",
        alpha: str = "white",
    ) -> None:
        check_choice(split, ("train", "test"), "split")
        hint = " (extract CUB_200_2011.tgz and give its path as root)"
        folder = find_list_folder(root, self.DEFAULT_ROOTS, "CUB_200_2011", "CUB-200-2011", hint)
        images, labels, flags = read_image_lists(folder)
        class_path = folder / "classes.txt"
        class_rows = [(_int(k, class_path, "class id"), v) for k, v in read_table(class_path)]
        class_ids = sorted(cid for cid, _ in class_rows)
        raw_by_id = dict(class_rows)
        index = {cid: i for i, cid in enumerate(class_ids)}
        self.raw_classes = [raw_by_id[cid] for cid in class_ids]
        keys = [k for k in images if flags[k] == (split == "train")]
        bad = [(k, labels[k]) for k in keys if labels[k] not in index]
        if bad:
            raise DataError(
                f"{folder / 'image_class_labels.txt'}: image {bad[0][0]} has class id {bad[0][1]} "
                f"not listed in {class_path}"
            )
        self.root = folder
        super().__init__(
            [str(folder / "images" / images[k]) for k in keys],
            np.array([index[labels[k]] for k in keys], dtype=np.int64),
            [clean_class_name(n) for n in self.raw_classes],
            source=str(folder),
            bad_images=bad_images,
            mode=mode,
            alpha=alpha,
        )

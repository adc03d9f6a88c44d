"""NABirds: the CUB file set plus ``hierarchy.txt`` (``<child id> <parent id>``) (METHODS.md §4).

Classes are the leaf classes that occur in ``image_class_labels.txt``, remapped to ``0..C-1`` in
increasing id order. ``reference_hierarchy`` groups the leaves under an ancestor: ``level="parent"`` (the
direct parent) or an integer depth below the root (1 = the root's children); a leaf shallower than the
depth asked for is grouped under its parent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from coarse2fine.config import quote
from coarse2fine.data.base import ImageFileDataset, check_choice
from coarse2fine.data.cub import _int, find_list_folder, read_image_lists, read_table
from coarse2fine.errors import ConfigError, DataError

LIST_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "hierarchy.txt")


def _ancestry(parents: dict[int, int], node: int, path: Path) -> list[int]:
    """[root, ..., node] following ``parents``; a cycle is a DataError."""
    chain = [node]
    while chain[-1] in parents:
        nxt = parents[chain[-1]]
        if nxt in chain:
            raise DataError(f"{path}: cycle in the hierarchy through class id {nxt}")
        chain.append(nxt)
    return chain[::-1]


def _unique_names(ids: list[int], names: dict[int, str]) -> dict[int, str]:
    """Class names, with the id appended to any name that occurs more than once."""
    counts: dict[str, int] = {}
    for cid in ids:
        counts[names[cid]] = counts.get(names[cid], 0) + 1
    return {cid: names[cid] if counts[names[cid]] == 1 else f"{names[cid]} [{cid}]" for cid in ids}


class NABirds(ImageFileDataset):
    """NABirds ``split`` ("train" / "test", the official split) with its reference hierarchy."""

    DEFAULT_ROOTS = (Path("data/nabirds"), Path("/usr/share/datasets/nabirds"))

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        *,
        bad_images: str = "error",
        level: str | int = "parent",
        mode: str = "RGB",
        alpha: str = "white",
    ) -> None:
        check_choice(split, ("train", "test"), "split")
        if level != "parent" and not (isinstance(level, int) and level >= 1):
            raise ConfigError(f"NABirds hierarchy level={quote(level)}: use 'parent' or a depth >= 1")
        folder = find_list_folder(root, self.DEFAULT_ROOTS, "nabirds", "NABirds")
        images, labels, flags = read_image_lists(folder)
        class_path, tree_path = folder / "classes.txt", folder / "hierarchy.txt"
        names = {_int(k, class_path, "class id"): v for k, v in read_table(class_path)}
        parents = {_int(k, tree_path, "child id"): _int(v, tree_path, "parent id") for k, v in read_table(tree_path)}
        for child, parent in parents.items():
            for cid in (child, parent):
                if cid not in names:
                    raise DataError(f"{tree_path}: class id {cid} is not listed in {class_path}")
        leaf_ids = sorted(set(labels.values()))
        unknown = [cid for cid in leaf_ids if cid not in names]
        if unknown:
            raise DataError(f"{folder / 'image_class_labels.txt'}: class id {unknown[0]} is not in {class_path}")
        index = {cid: i for i, cid in enumerate(leaf_ids)}
        display = _unique_names(leaf_ids, names)
        self.class_ids = leaf_ids
        self.reference_hierarchy_ids = {cid: _ancestry(parents, cid, tree_path) for cid in leaf_ids}
        groups: dict[int, list[str]] = {}
        for cid, chain in self.reference_hierarchy_ids.items():
            if len(chain) < 2:
                continue  # a leaf without a parent belongs to no group
            depth = len(chain) - 2 if level == "parent" else min(int(level), len(chain) - 2)
            groups.setdefault(chain[depth], []).append(display[cid])
        group_names = _unique_names(sorted(groups), names)
        keys = [k for k in images if flags[k] == (split == "train")]
        self.root = folder
        super().__init__(
            [str(folder / "images" / images[k]) for k in keys],
            np.array([index[labels[k]] for k in keys], dtype=np.int64),
            [display[cid] for cid in leaf_ids],
            source=str(folder),
            bad_images=bad_images,
            mode=mode,
            alpha=alpha,
            reference_hierarchy={group_names[g]: groups[g] for g in sorted(groups)} or None,
        )

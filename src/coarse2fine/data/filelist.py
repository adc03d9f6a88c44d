"""Split files: which images of a folder tree are training and which test images (METHODS.md §4).

A CSV with the header ``path,label,split``: ``path`` relative to the data root (``/``-separated),
``label`` a class name of the tree, ``split`` ``train`` or ``test``. ``data.split_file`` gives one; a run
saves the split it used as ``<run>/split.csv`` so that evaluation and resumed runs read the same images.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coarse2fine.data.folder import LinkPolicy
from coarse2fine.errors import DataError

SPLITS = ("train", "test")
HEADER = ("path", "label", "split")


@dataclass(frozen=True)
class SplitList:
    """Images of a tree with their class index and split; ``paths`` relative to ``root``."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # int64 indices into classes
    test: np.ndarray  # bool: True for test images
    classes: list[str]

    def absolute(self) -> list[str]:
        return [os.path.join(self.root, p) for p in self.paths]

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        for path, label, test in zip(self.paths, self.labels.tolist(), self.test.tolist()):
            writer.writerow((path, self.classes[label], "test" if test else "train"))
        return out.getvalue()

    @classmethod
    def from_files(cls, root: Path, paths: Sequence[str], labels: np.ndarray, test: np.ndarray, classes: list[str]):
        """From absolute ``paths`` under ``root`` (stored relative to it)."""
        rel = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
        return cls(Path(root), rel, np.asarray(labels, dtype=np.int64), np.asarray(test, dtype=bool), list(classes))


def _rows(file: Path) -> list[list[str]]:
    if not file.is_file():
        raise DataError(f"split file {str(file)!r} does not exist")
    try:
        rows = list(csv.reader(file.read_text(encoding="utf-8").splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"split file {str(file)!r} is not a UTF-8 CSV file: {exc}") from None
    if not rows or tuple(c.strip() for c in rows[0][:3]) != HEADER:
        raise DataError(f"split file {str(file)!r}: the first line must be the header {','.join(HEADER)}")
    if len(rows) < 2:
        raise DataError(f"split file {str(file)!r} lists no images")
    return rows[1:]


class _Inside:
    """Whether a listed file exists and stays under the root, with one realpath per folder."""

    def __init__(self, links: LinkPolicy) -> None:
        self.links = links
        self.folders: dict[str, bool] = {}

    def check(self, full: str, where: str) -> None:
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                os.stat(full)  # a dangling link: FileNotFoundError
        except OSError:
            raise DataError(f"{where}: {full}: image file does not exist (has the tree changed?)") from None
        if self.links.follow_external:
            return
        folder = os.path.dirname(full)
        if folder not in self.folders:
            self.folders[folder] = self.links.inside(folder)
        if (stat.S_ISLNK(st.st_mode) or not self.folders[folder]) and not self.links.inside(full):
            what = f"symbolic link to {os.path.realpath(full)}" if stat.S_ISLNK(st.st_mode) else "file"
            raise DataError(
                f"{where}: {full}: {what} lies outside the data root {self.links.root}; move the data inside it, "
                "or set data.follow_external_links: true"
            )


def read_split_file(file: str | os.PathLike[str], root: Path, classes: list[str], links: LinkPolicy) -> SplitList:
    """Read and check a split file against the tree at ``root`` with class names ``classes``.

    DataError naming the file and line for a missing file (the first one), an unknown class or split
    value, a path listed twice, a path (or link) leading out of the root (unless the policy allows it),
    and a class without any training image.
    """
    file = Path(file)
    index = {name: i for i, name in enumerate(classes)}
    inside = _Inside(links)
    paths, labels, test, seen = [], [], [], set()
    for line, row in enumerate(_rows(file), start=2):
        where = f"split file {str(file)!r}, line {line}"
        if len(row) < 3:
            raise DataError(f"{where}: expected path,label,split, got {','.join(row)!r}")
        path, label, split = row[0].strip(), row[1].strip(), row[2].strip()
        if label not in index:
            raise DataError(f"{where}: unknown class {label!r}; the classes of {root} are {', '.join(classes)}")
        if split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not train or test")
        if path in seen:
            raise DataError(f"{where}: {path} is listed twice")
        seen.add(path)
        inside.check(os.path.join(root, path), where)
        paths.append(path)
        labels.append(index[label])
        test.append(split == "test")
    out = SplitList(Path(root), paths, np.asarray(labels, dtype=np.int64), np.asarray(test, dtype=bool), classes)
    if not out.test.any():
        raise DataError(f"split file {str(file)!r} lists no test image (split column: train or test)")
    counts = np.bincount(out.labels[~out.test], minlength=len(classes))
    if (counts == 0).any():
        missing = [classes[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"split file {str(file)!r}: class(es) {', '.join(missing)} have no training image")
    return out

"""CIFAR-100 (and CIFAR-10) python pickles, read by a restricted unpickler (METHODS.md §4).

CIFAR-100 (``cifar-100-python/``): ``train`` and ``test`` hold a dict with ``data`` (uint8 N x 3072, rows of
R, G, B planes of 32x32), ``fine_labels``, ``coarse_labels``, ``filenames``, ``batch_label``; ``meta`` holds
``fine_label_names`` and ``coarse_label_names``. The files were written by Python 2, so their keys and
names load as ``str`` (with ``encoding="latin1"``); files re-written by Python 3 have ``bytes`` keys
(``b'data'``). Both are accepted. CIFAR-10 (``cifar-10-batches-py/``): ``data_batch_1..5``,
``test_batch``, ``batches.meta`` with ``labels`` / ``label_names``.

Pickles can run code when loaded; :class:`RestrictedUnpickler` resolves only the globals that numpy array
reconstruction needs, so a pickle that names anything else (``os.system``, ``builtins.eval`` ...) is
refused before it runs.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from coarse2fine.data.base import InMemoryDataset, check_choice, check_labels
from coarse2fine.data.locate import candidate_roots, download_files, find_root
from coarse2fine.errors import DataError

_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
_SCALAR = np.int64(0).__reduce__()[0]  # numpy's scalar()
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store Python 3 bytes
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that allows plain containers, strings, bytes, numbers and numpy arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed (only numpy arrays and plain containers)"
            ) from None


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a pickle with :class:`RestrictedUnpickler`; any refusal or corruption is a DataError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refused or corrupt pickle: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise DataError(f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _as_dict(obj: Any, path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """The pickle's dict with ``str`` keys (``bytes`` keys decoded); required keys checked."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    out = {_text(k): v for k, v in obj.items()}
    missing = [k for k in required if k not in out]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; found {', '.join(sorted(out))}")
    return out


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = meta[key]
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{path}: {key!r} must be a non-empty list of names")
    return [_text(n) for n in names]


def _images(batch: dict[str, Any], path: Path) -> np.ndarray:
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {type(data).__name__} {shape}")
    return data


def _labels(batch: dict[str, Any], key: str, n: int, path: Path) -> np.ndarray:
    labels = np.asarray(batch[key])
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path}: {key!r} has {labels.size} entries for {n} images")
    return labels


def _to_tensor(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))


def _locate(
    root: Any, folder: str, defaults: tuple[Path, ...], needed: tuple[str, ...]
) -> tuple[Path | None, list[Path]]:
    searched = []
    for cand in candidate_roots(root, defaults):
        searched += [cand, cand / folder]
    found = find_root(searched, lambda p: all((p / f).is_file() for f in needed))
    return found, searched


def _missing(name: str, needed: tuple[str, ...], folder: str, searched: list[Path], failure: str | None) -> DataError:
    where = ", ".join(str(p) for p in searched)
    hint = f" Download failed: {failure}." if failure else " Pass download=True to fetch it."
    return DataError(
        f"{name} files {', '.join(needed)} not found (looked in: {where}).{hint} Put the extracted "
        f"'{folder}/' folder (from the python version archive) under data/ or give its path as root."
    )


class _CIFARBase(InMemoryDataset):
    NAME = ""
    FOLDER = ""
    URL = ""
    ARCHIVE: tuple[str, str] = ("", "")
    SPLITS: ClassVar[dict[str, tuple[str, ...]]] = {}
    META = ""

    def _find(self, root: Any, split: str, download: bool) -> Path:
        needed = (*self.SPLITS[split], self.META)
        defaults = (Path("data"), Path("/usr/share/datasets"))
        folder, searched = _locate(root, self.FOLDER, defaults, needed)
        if folder is None:
            if not download:
                raise _missing(self.NAME, needed, self.FOLDER, searched, None)
            target = Path(root).expanduser() if root is not None else Path("data")
            try:
                download_files(target, [self.URL], [self.ARCHIVE], extract=True)
            except DataError as exc:
                raise _missing(self.NAME, needed, self.FOLDER, searched, str(exc)) from None
            folder = target / self.FOLDER
        return folder


class CIFAR100(_CIFARBase):
    """CIFAR-100 ``split`` ("train" / "test"); ``label="fine"`` (100 classes) or ``"coarse"`` (20).

    With fine labels, ``reference_hierarchy`` maps each coarse name to the fine names found with it.
    """

    NAME = "CIFAR-100"
    FOLDER = "cifar-100-python"
    URL = "https://www.cs.toronto.edu/~kriz/"
    ARCHIVE = ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
    SPLITS: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train",), "test": ("test",)}
    META = "meta"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        label: str = "fine",
        download: bool = False,
    ) -> None:
        check_choice(split, tuple(self.SPLITS), "split")
        check_choice(label, ("fine", "coarse"), "label")
        folder = self._find(root, split, download)
        meta_path, path = folder / self.META, folder / self.SPLITS[split][0]
        meta = _as_dict(safe_load_pickle(meta_path), meta_path, ("fine_label_names", "coarse_label_names"))
        fine_names = _names(meta, "fine_label_names", meta_path)
        coarse_names = _names(meta, "coarse_label_names", meta_path)
        batch = _as_dict(safe_load_pickle(path), path, ("data", "fine_labels", "coarse_labels"))
        data = _images(batch, path)
        fine = _labels(batch, "fine_labels", len(data), path)
        coarse = _labels(batch, "coarse_labels", len(data), path)
        self.root = folder
        self.fine_classes, self.coarse_classes = fine_names, coarse_names
        fine = check_labels(fine, len(fine_names), f"{path} (fine_labels)")
        coarse = check_labels(coarse, len(coarse_names), f"{path} (coarse_labels)")
        self.fine_targets, self.coarse_targets = fine, coarse
        if label == "coarse":
            targets, classes, tree = coarse, coarse_names, None
        else:
            targets, classes = fine, fine_names
            tree = self._hierarchy(fine, coarse, fine_names, coarse_names, path)
        super().__init__(_to_tensor(data), targets, classes, source=str(path), reference_hierarchy=tree)

    @staticmethod
    def _hierarchy(
        fine: np.ndarray, coarse: np.ndarray, fine_names: list[str], coarse_names: list[str], path: Path
    ) -> dict[str, list[str]]:
        """{coarse name: [fine names]} from the (fine, coarse) label pairs of the data."""
        pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
        owner: dict[int, int] = {}
        for f, c in pairs.tolist():
            if f in owner:
                raise DataError(
                    f"{path}: fine class {fine_names[f]!r} appears under two coarse classes "
                    f"{coarse_names[owner[f]]!r} and {coarse_names[c]!r}"
                )
            owner[f] = c
        tree: dict[str, list[str]] = {}
        for c, name in enumerate(coarse_names):
            members = [fine_names[f] for f in sorted(owner) if owner[f] == c]
            if members:
                tree[name] = members
        return tree


class CIFAR10(_CIFARBase):
    """CIFAR-10 ``split`` ("train": five data batches, "test")."""

    NAME = "CIFAR-10"
    FOLDER = "cifar-10-batches-py"
    URL = "https://www.cs.toronto.edu/~kriz/"
    ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
    SPLITS: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }
    META = "batches.meta"

    def __init__(
        self, root: str | os.PathLike[str] | None = None, split: str = "train", download: bool = False
    ) -> None:
        check_choice(split, tuple(self.SPLITS), "split")
        folder = self._find(root, split, download)
        meta_path = folder / self.META
        names = _names(_as_dict(safe_load_pickle(meta_path), meta_path, ("label_names",)), "label_names", meta_path)
        datas, labels = [], []
        for fname in self.SPLITS[split]:
            path = folder / fname
            batch = _as_dict(safe_load_pickle(path), path, ("data", "labels"))
            datas.append(_images(batch, path))
            labels.append(_labels(batch, "labels", len(datas[-1]), path))
        self.root = folder
        super().__init__(_to_tensor(np.concatenate(datas)), np.concatenate(labels), names, source=str(folder))

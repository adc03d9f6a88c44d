"""Small-image file datasets decoded once into a cached uint8 array (METHODS.md §4 "Class-per-folder trees").

The images of an :class:`~coarse2fine.data.base.ImageFileDataset` that share one size are decoded (in
parallel, with a progress bar) into an array ``(N, C, H, W)`` saved under the cache folder, and come back
as an :class:`~coarse2fine.data.base.InMemoryDataset`: the loader then augments them a batch at a time,
as it does Fashion-MNIST. An entry is named by a hash of the file list (and colour mode) and records a
fingerprint of every file's size and modification time; a changed file rebuilds it. An entry is
``<name>.json`` (fingerprint, shape, images left out) and ``<name>-<fingerprint>.npy``, each written to a
temporary file and renamed (the JSON last), so a reader never sees half an entry. Processes that want
the same entry at once (the ranks of a ``torchrun`` job, two runs) take turns on ``.<name>.lock``: the first
decodes, the others wait and read its entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from coarse2fine.data.base import ImageFileDataset, InMemoryDataset, load_image
from coarse2fine.errors import DataError

try:
    import fcntl  # POSIX: the lock that makes processes take turns on one cache entry
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "on", "off")
SMALL_IMAGE = 64  # a small-image dataset: every image the same square size of at most this many pixels
_FORMAT = "c2f-folder-cache-1"


def default_cache_dir() -> Path:
    """``$C2F_CACHE_DIR``, else ``~/.cache/coarse2fine/folders``."""
    env = os.environ.get("C2F_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "coarse2fine" / "folders"


def decode(path: str, mode: str = "RGB", alpha: str = "white") -> np.ndarray:
    """One image as a uint8 ``(H, W, C)`` array (DataError for a bad file)."""
    arr = np.asarray(load_image(path, mode, alpha))
    return arr[:, :, None] if arr.ndim == 2 else arr


def cache_keys(dataset: ImageFileDataset) -> tuple[str, str]:
    """(name, fingerprint): a hash of the file list and colour mode, and of every file's size and mtime."""
    name = hashlib.sha256(f"{_FORMAT}\0{dataset.mode}\0{dataset.alpha}\0".encode())
    for path in dataset.paths:
        name.update(os.fsencode(path) + b"\0")
    fingerprint = hashlib.sha256(name.digest())
    for path in dataset.paths:
        try:
            st = os.stat(path)
            fingerprint.update(struct.pack("<qq", st.st_size, st.st_mtime_ns))
        except OSError:
            fingerprint.update(struct.pack("<qq", -1, -1))
    return name.hexdigest()[:24], fingerprint.hexdigest()[:24]


class _Decode(torch.utils.data.Dataset):
    """Item i: (i, (H, W, C) array or None, problem) where problem is "" , "bad: ..." or "size: WxH"."""

    def __init__(self, dataset: ImageFileDataset, size: tuple[int, int]) -> None:
        self.paths, self.mode, self.alpha, self.size = dataset.paths, dataset.mode, dataset.alpha, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            arr = decode(self.paths[i], self.mode, self.alpha)
        except DataError as exc:
            return i, None, f"bad: {exc}"
        if arr.shape[1::-1] != self.size:
            return i, None, f"size: {arr.shape[1]}x{arr.shape[0]}"
        return i, arr, ""


def _stack(items: list[tuple[int, np.ndarray | None, str]]) -> tuple[np.ndarray, np.ndarray | None, list[Any]]:
    """In the worker: the good images of a batch as one array (one transfer), and the problems."""
    good = [(i, a) for i, a, p in items if not p]
    problems = [(i, p) for i, _, p in items if p]
    idx = np.asarray([i for i, _ in good], dtype=np.int64)
    return idx, (np.stack([a for _, a in good]) if good else None), problems


def _decode_all(
    dataset: ImageFileDataset, size: tuple[int, int], workers: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Every image decoded: (uint8 (N, C, H, W) array, mask of decoded images, problems in file order);
    stops at the first image of another size, or the first bad one under ``bad_images="error"``."""
    n, channels = len(dataset), dataset.num_channels
    images = np.zeros((n, channels, size[1], size[0]), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    problems: list[tuple[int, str]] = []
    loader = torch.utils.data.DataLoader(
        _Decode(dataset, size), batch_size=256, num_workers=workers, collate_fn=_stack,
        worker_init_fn=_one_thread if workers else None,
    )  # fmt: skip
    desc = f"caching {n} images of {Path(dataset.source).name}"
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for idx, arr, found in loader:
            if arr is not None:
                images[idx] = arr.transpose(0, 3, 1, 2)
                ok[idx] = True
            problems += found
            bar.update(len(idx) + len(found))
            if any(p.startswith("size") or dataset.bad_images == "error" for _, p in found):
                break  # the build ends here: no need to decode the rest
    return images, ok, sorted(problems)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def _load(folder: Path, name: str, fingerprint: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
        if meta.get("format") != _FORMAT or meta.get("fingerprint") != fingerprint:
            return None
        images = np.load(folder / meta["array"], allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if images.dtype != np.uint8 or list(images.shape) != meta.get("shape"):
        return None
    return images, meta


@contextlib.contextmanager
def _turn(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (POSIX ``flock``; freed if the process dies); without one
    (another OS, a read-only cache folder) no waiting: at worst two processes decode the same entry."""
    try:
        if fcntl is None:
            raise OSError("no flock on this system")
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+b")  # noqa: SIM115 - held for the block
    except OSError:
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # releases the lock


def _replace(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save(folder: Path, name: str, fingerprint: str, images: np.ndarray, meta: dict[str, Any]) -> None:
    """Write the entry atomically, then remove the arrays of earlier fingerprints; a failure only warns."""
    array = folder / f"{name}-{fingerprint}.npy"
    meta = {"format": _FORMAT, "fingerprint": fingerprint, "array": array.name, "shape": list(images.shape), **meta}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _replace(array, lambda fh: np.save(fh, images, allow_pickle=False))
        _replace(folder / f"{name}.json", lambda fh: fh.write(json.dumps(meta).encode()))
        for old in folder.glob(f"{name}-*.npy"):
            if old != array:
                old.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not write the image cache %s (%s); the images stay decoded for this run only", array, exc)


def _build(
    dataset: ImageFileDataset, size: tuple[int, int], workers: int, progress: bool, strict: bool
) -> tuple[np.ndarray, dict[str, str]] | None:
    """Decode ``dataset``: (images of the kept files, {index: reason} of those left out); None when an
    image has another size and not ``strict`` (the dataset stays a file dataset)."""
    images, ok, problems = _decode_all(dataset, size, workers, progress)
    dropped: dict[str, str] = {}
    for i, problem in problems:
        path = dataset.paths[i]
        kind, _, what = problem.partition(": ")
        if kind == "size":
            message = f"{path} is {what} but the other images are {size[0]}x{size[1]}"
            if strict:
                raise DataError(f"{message}: data.cache=on needs images of one size (use data.cache=off)")
            log.warning("%s: decoding each image when it is used, without the cache", message)
            return None
        if dataset.bad_images == "error":
            raise DataError(f"{what} (use --set data.bad_images=skip to leave it out)")
        dropped[str(i)] = what
    return (images if ok.all() else images[ok]), dropped


def cached_images(
    dataset: ImageFileDataset,
    size: tuple[int, int],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    progress: bool = False,
    strict: bool = False,
) -> InMemoryDataset | None:
    """``dataset``'s images, all ``size`` (W, H), as an InMemoryDataset, from the cache or decoded into it.

    ``workers`` processes decode; bad images follow ``dataset.bad_images`` (``skip``: left out, listed in
    the result's ``skipped``). ``file_index`` maps the result's items to ``dataset``'s. An image of
    another size gives None (``strict``: DataError naming it).
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name, fingerprint = cache_keys(dataset)
    found = _load(folder, name, fingerprint)
    if found is None:
        with _turn(folder / f".{name}.lock"):
            found = _load(folder, name, fingerprint)  # written by whoever held the lock before
            if found is None:
                built = _build(dataset, size, workers, progress, strict)
                if built is None:
                    return None
                images, dropped = built
                _save(folder, name, fingerprint, images, {"source": str(dataset.source), "dropped": dropped})
    if found is not None:
        images, meta = found
        dropped = meta.get("dropped", {})
        log.info("%d images of %s read from the cache %s", images.shape[0], dataset.source, folder)
    keep = np.ones(len(dataset), dtype=bool)
    keep[[int(i) for i in dropped]] = False
    if int(keep.sum()) != images.shape[0]:
        raise DataError(f"image cache {folder / name} does not match {dataset.source}; delete it and rerun")
    if not keep.any():
        raise DataError(f"{dataset.source}: no readable images ({len(dropped)} skipped)")
    mem = InMemoryDataset(torch.from_numpy(images), dataset.targets[keep], dataset.classes, source=dataset.source)
    mem.skipped = {**dataset.skipped, **{dataset.paths[int(i)]: why for i, why in dropped.items()}}
    mem.file_index = np.flatnonzero(keep)
    return mem

"""Dataset base classes shared by every reader (METHODS.md §4), image decoding and dataset views.

Two kinds of dataset follow the data contract in ``docs/ARCHITECTURE.md``:

- :class:`InMemoryDataset` keeps a uint8 tensor ``(N, C, H, W)``; the loader slices and augments it a
  batch at a time.
- :class:`ImageFileDataset` keeps file paths; ``__getitem__`` decodes one image with Pillow (converted to
  RGB, or L for a grayscale dataset) and applies the bad-image policy ``error | skip``.

:class:`DatasetView` is a subset of either (the stratified split, ``limit_train``) that keeps
``classes`` and ``targets``.
"""

from __future__ import annotations

import array
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from coarse2fine.config import quote
from coarse2fine.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".pbm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
BAD_IMAGE_POLICIES = ("error", "skip")
ALPHA_POLICIES = ("white", "drop")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{what}={quote(value)} is not valid; choose one of {', '.join(map(repr, choices))}")
    return value


def check_labels(targets: Any, num_classes: int, source: str) -> np.ndarray:
    """Labels as int64, each in ``[0, num_classes)``; otherwise DataError naming ``source`` and the value."""
    arr = np.asarray(targets)
    if arr.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{source}: label {int(arr[i])} at index {i} is out of range [0, {num_classes}) "
            f"({bad.size} labels out of range)"
        )
    return arr


def check_class_names(classes: Sequence[str], source: str) -> list[str]:
    """Class names must be unique strings (a duplicate would merge two classes in every report)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(classes):
        if name in seen:
            raise DataError(f"{source}: duplicate class name {name!r} (classes {seen[name]} and {i})")
        seen[name] = i
    return list(classes)


# ---- image decoding ----------------------------------------------------------------------------


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale -> 8-bit L, scaling the 16-bit range to 0..255."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and arr.size and arr.max() > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def convert_mode(img: Image.Image, mode: str = "RGB", alpha: str = "white") -> Image.Image:
    """Convert any Pillow mode to ``mode`` ("RGB" or "L").

    Grayscale, palette (with or without transparency), CMYK, 1-bit and 16-bit images are handled;
    an alpha channel is composited on white (``alpha="white"``) or dropped (``alpha="drop"``).
    """
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        img = _to_eight_bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    elif img.mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        if alpha == "white":
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")
    if img.mode != mode:
        img = img.convert(mode)
    return img


def load_image(path: str | os.PathLike[str], mode: str = "RGB", alpha: str = "white") -> Image.Image:
    """Decode one image file fully, converted to ``mode``.

    Corrupt, truncated, zero-byte and non-image files raise DataError naming the path. An image larger
    than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is refused from its header,
    before any pixel is decoded.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh)
            width, height = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise DataError(
                    f"{path}: {width}x{height} = {width * height} pixels exceeds Pillow's decompression-bomb "
                    f"limit of {limit} pixels; refused without decoding (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
                )
            img.load()
            return convert_mode(img, mode, alpha)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused without decoding: {exc}") from None
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied)") from None
    except UnidentifiedImageError:
        size = os.path.getsize(path) if os.path.exists(path) else -1
        what = "empty (zero-byte) file" if size == 0 else "not an image Pillow can identify"
        raise DataError(f"{path}: {what}") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({type(exc).__name__}: {exc})") from None


# ---- datasets ----------------------------------------------------------------------------------


class InMemoryDataset(torch.utils.data.Dataset):
    """A dataset held as a uint8 tensor ``images`` of shape ``(N, C, H, W)``."""

    in_memory = True

    def __init__(
        self,
        images: torch.Tensor,
        targets: Any,
        classes: Sequence[str],
        *,
        source: str,
        reference_hierarchy: dict[str, list[str]] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{source}: expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.classes = check_class_names(classes, source)
        self.targets = check_labels(targets, len(self.classes), source)
        if len(self.targets) != images.shape[0]:
            raise DataError(f"{source}: {images.shape[0]} images but {len(self.targets)} labels")
        self.images = images.contiguous()
        self.source = source
        self.reference_hierarchy = reference_hierarchy
        self.num_channels = int(images.shape[1])
        self.default_image_size = int(images.shape[2])
        self.skipped: dict[str, str] = {}  # files left out when the images were decoded (folder cache)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, n={len(self)}, classes={len(self.classes)})"


class PathTable(Sequence[str]):
    """File paths packed in one uint8 buffer plus offsets: no per-path Python objects, so forked loader
    workers do not copy the table page by page as reference counts change, and a million paths cost
    tens of MB. Built incrementally from any iterable (a generator keeps the listing itself small)."""

    def __init__(self, paths: Iterable[str]) -> None:
        buffer = bytearray()
        offsets = array.array("q", [0])
        for path in paths:
            buffer += os.fsencode(path)
            offsets.append(len(buffer))
        self._buffer = np.frombuffer(bytes(buffer), dtype=np.uint8)
        self._offsets = np.frombuffer(offsets, dtype=np.int64).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"path index {index} out of range for {n} paths")
        index %= n
        return os.fsdecode(self._buffer[self._offsets[index] : self._offsets[index + 1]].tobytes())


@dataclass(frozen=True)
class Skipped:
    """Returned by ``ImageFileDataset.__getitem__`` in ``skip`` mode for an image that cannot be read."""

    path: str
    reason: str


class ImageFileDataset(torch.utils.data.Dataset):
    """Images stored as files. ``__getitem__`` returns ``(PIL image, label)`` (or :class:`Skipped`).

    ``bad_images="error"`` raises DataError naming the file; ``"skip"`` drops it: missing and zero-byte
    files are dropped when the dataset is built, undecodable ones when they are met, and every skipped
    file is recorded in ``skipped`` (path -> reason) so the CLI can report them at the end.
    """

    in_memory = False

    def __init__(
        self,
        paths: Sequence[str],
        targets: Any,
        classes: Sequence[str],
        *,
        source: str,
        mode: str = "RGB",
        bad_images: str = "error",
        alpha: str = "white",
        default_image_size: int = 224,
        reference_hierarchy: dict[str, list[str]] | None = None,
        check_files: bool = True,
    ) -> None:
        check_choice(mode, ("RGB", "L"), "mode")
        check_choice(bad_images, BAD_IMAGE_POLICIES, "bad_images")
        check_choice(alpha, ALPHA_POLICIES, "alpha")
        self.source = source
        self.classes = check_class_names(classes, source)
        targets = check_labels(targets, len(self.classes), source)
        if len(targets) != len(paths):
            raise DataError(f"{source}: {len(paths)} images but {len(targets)} labels")
        self.mode = mode
        self.bad_images = bad_images
        self.alpha = alpha
        self.skipped: dict[str, str] = {}
        keep = self._check_files(paths) if check_files else None
        if keep is not None:
            paths = PathTable(p for p, k in zip(paths, keep) if k)
            targets = targets[np.asarray(keep, dtype=bool)]
        self.paths = paths if isinstance(paths, PathTable) else PathTable(paths)
        self.targets = targets
        if not self.paths:
            raise DataError(f"{source}: no images" + (f" ({len(self.skipped)} skipped)" if self.skipped else ""))
        self.num_channels = 3 if mode == "RGB" else 1
        self.default_image_size = default_image_size
        self.reference_hierarchy = reference_hierarchy

    def _check_files(self, paths: Sequence[str]) -> list[bool] | None:
        """Missing and zero-byte files: DataError (``error``) or dropped and recorded (``skip``)."""
        keep = []
        for path in paths:
            try:
                size = os.stat(path).st_size
                reason = "empty (zero-byte) file" if size == 0 else ""
            except OSError:
                reason = "image file does not exist"
            if reason and self.bad_images == "error":
                raise DataError(f"{path}: {reason} (use --set data.bad_images=skip to leave it out)")
            if reason:
                self.skipped[path] = reason
            keep.append(not reason)
        return keep if self.skipped else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int] | Skipped:
        path = self.paths[index]
        try:
            img = load_image(path, self.mode, self.alpha)
        except DataError as exc:
            if self.bad_images == "error":
                raise DataError(f"{exc} (use --set data.bad_images=skip to leave it out)") from None
            if path not in self.skipped:
                log.warning("skipping bad image %s", exc)
                self.skipped[path] = str(exc)
            return Skipped(path, str(exc))
        return img, int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, n={len(self)}, classes={len(self.classes)})"


class DatasetView(torch.utils.data.Dataset):
    """The items ``indices`` of ``base``; keeps ``classes``, ``targets`` and the dataset's attributes."""

    def __init__(self, base: Any, indices: Any) -> None:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(base)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise DataError(f"subset of {base!r}: index out of range [0, {n})")
        self.base = base
        self.indices = np.where(idx < 0, idx + n, idx)
        self.targets = np.asarray(base.targets)[self.indices]
        self.classes = base.classes

    in_memory = property(lambda self: self.base.in_memory)
    num_channels = property(lambda self: self.base.num_channels)
    default_image_size = property(lambda self: self.base.default_image_size)
    reference_hierarchy = property(lambda self: getattr(self.base, "reference_hierarchy", None))
    skipped = property(lambda self: getattr(self.base, "skipped", {}))
    source = property(lambda self: getattr(self.base, "source", repr(self.base)))

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> Any:
        return self.base[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"DatasetView({self.base!r}, n={len(self)})"


def subset(dataset: Any, indices: Any) -> DatasetView:
    """A view of ``dataset`` restricted to ``indices`` (views of views are flattened)."""
    if isinstance(dataset, DatasetView):
        return DatasetView(dataset.base, dataset.indices[np.asarray(indices, dtype=np.int64)])
    return DatasetView(dataset, indices)


class LocalLabelView(DatasetView):
    """The images of ``base`` whose label is in ``members``, relabelled 0..|S_k|-1
    (a fine component's training set, METHODS.md §2.3)."""

    def __init__(self, base: Any, members: Sequence[int]) -> None:
        targets = np.asarray(base.targets)
        idx = np.flatnonzero(np.isin(targets, members))
        view = subset(base, idx)
        super().__init__(view.base, view.indices)
        remap = np.full(len(base.classes), -1, dtype=np.int64)
        remap[np.asarray(members)] = np.arange(len(members))
        self.remap = remap
        self.targets = remap[np.asarray(self.targets)]
        self.classes = [base.classes[j] for j in members]

    def __getitem__(self, index: int) -> Any:
        item = super().__getitem__(index)
        if isinstance(item, tuple):
            return item[0], int(self.remap[item[1]])
        return item


def class_counts(dataset: Any, num_classes: int) -> np.ndarray:
    """Images per class of ``dataset``, ``num_classes`` long."""
    return np.bincount(np.asarray(dataset.targets, dtype=np.int64), minlength=num_classes)


def resolve_memory(dataset: Any) -> tuple[torch.Tensor, np.ndarray | None]:
    """The uint8 image tensor behind an in-memory dataset or view, and the view's indices into it."""
    if isinstance(dataset, DatasetView):
        images, idx = resolve_memory(dataset.base)
        return images, dataset.indices if idx is None else idx[dataset.indices]
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor):
        raise DataError(f"{dataset!r} is not an in-memory dataset (no uint8 `images` tensor)")
    return images, None

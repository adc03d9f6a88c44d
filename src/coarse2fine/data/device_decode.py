"""JPEG decoding on the training device (``data.decode_device``; docs/BENCHMARKS.md, "Data feeding on a GPU").

With large images the loader's cost is Pillow's JPEG decode and resize, one image at a time in the workers.
Here the workers only read each file's bytes; the main process decodes the
whole batch in one call, ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA, libjpeg-turbo
on the CPU), then resizes, crops, flips, colour-shifts and normalises on that device
(:class:`DeviceTransform`, the VGG scale pipeline of ``transforms.large_train_transform`` /
``large_eval_transform``). Files that are not JPEG (PNG, ...) are decoded in the worker
(``torchvision.io.decode_image``) and join the batch on the device. With ``device="cpu"`` the same code
runs on the CPU, which is how the tests compare it with the Pillow path.

Augmentation randomness comes from a CPU generator seeded by ``(seed, epoch, rank)`` (the loader
contract); the draws differ from the Pillow path's, the distributions are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from coarse2fine.data.base import DatasetView, Skipped
from coarse2fine.data.loader import Batch, FileLoader
from coarse2fine.data.transforms import IMAGENET_PCA, _as_stats, _check_scale, eval_scale, train_scales
from coarse2fine.errors import ConfigError, DataError

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Encoded:
    """One file: its bytes (``jpeg``) or, for other formats, its pixels decoded in the worker (uint8 CHW)."""

    data: torch.Tensor
    jpeg: bool
    path: str


def _path_of(dataset: Any, index: int) -> str:
    while isinstance(dataset, DatasetView):
        dataset, index = dataset.base, int(dataset.indices[index])
    return dataset.paths[index]


def _base(dataset: Any) -> Any:
    while isinstance(dataset, DatasetView):
        dataset = dataset.base
    return dataset


class EncodedFiles(torch.utils.data.Dataset):
    """A file dataset (``ImageFileDataset`` or a view of one) whose items are ``(Encoded, label)``.

    Keeps the dataset's ``classes``, ``targets`` and ``skipped``; a file that cannot be read or (not JPEG)
    decoded follows the dataset's ``bad_images`` policy.
    """

    in_memory = False

    def __init__(self, dataset: Any) -> None:
        base = _base(dataset)
        if not hasattr(base, "paths"):
            raise ConfigError(f"data.decode_device needs a dataset of image files, got {dataset!r}")
        self.dataset = dataset
        self.mode = ImageReadMode.GRAY if getattr(base, "mode", "RGB") == "L" else ImageReadMode.RGB
        self.bad_images = getattr(base, "bad_images", "error")
        self.classes, self.targets = dataset.classes, dataset.targets

    skipped = property(lambda self: getattr(self.dataset, "skipped", {}))
    source = property(lambda self: getattr(self.dataset, "source", repr(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Encoded, int] | Skipped:
        path = _path_of(self.dataset, index)
        try:
            with open(path, "rb") as fh:  # torchvision's read_file maps the file: its storage cannot cross
                data = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)  # to the main process
            jpeg = bytes(data[:3].tolist()) == JPEG_MAGIC
            item = Encoded(data if jpeg else decode_image(data, mode=self.mode), jpeg, path)
        except (OSError, RuntimeError, ValueError) as exc:
            return bad_image(path, f"cannot read or decode ({type(exc).__name__}: {exc})", self.bad_images)
        return item, int(self.targets[index])


def bad_image(path: str, reason: str, policy: str) -> Skipped:
    """``error``: DataError naming the file; ``skip``: the record the loader drops and logs."""
    if policy == "error":
        raise DataError(f"{path}: {reason} (use --set data.bad_images=skip to leave it out)")
    return Skipped(path, reason)


def collate_encoded(items: list[Any]) -> tuple[list[Encoded], torch.Tensor, list[Skipped]]:
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    return [e for e, _ in good], torch.as_tensor([y for _, y in good], dtype=torch.int64), skipped


def decode_batch(
    items: Sequence[Encoded], device: torch.device, mode: ImageReadMode, bad_images: str = "error"
) -> tuple[list[torch.Tensor], list[Skipped]]:
    """uint8 (C, H, W) images on ``device`` (the JPEGs in one ``decode_jpeg`` call, the rest moved there)
    and the files dropped under ``bad_images="skip"`` (their images are left out, in order)."""
    jpegs = [i for i, e in enumerate(items) if e.jpeg]
    out: list[torch.Tensor | Skipped] = [e.data.to(device) for e in items]
    if jpegs:
        try:
            decoded: list[torch.Tensor | Skipped] = decode_jpeg([items[i].data for i in jpegs], mode=mode,
                                                                device=device)
        except RuntimeError:  # find the file: decode one at a time
            decoded = [_decode_one(items[i], device, mode, bad_images) for i in jpegs]
        for i, img in zip(jpegs, decoded):
            out[i] = img
    return [t for t in out if not isinstance(t, Skipped)], [t for t in out if isinstance(t, Skipped)]


def _decode_one(item: Encoded, device: torch.device, mode: ImageReadMode, bad_images: str) -> torch.Tensor | Skipped:
    try:
        return decode_jpeg(item.data, mode=mode, device=device)
    except RuntimeError as exc:
        return bad_image(item.path, f"corrupt or truncated JPEG ({exc})", bad_images)


class DeviceTransform:
    """The VGG scale pipeline on a list of uint8 (C, H, W) images on any device -> float (B, C, crop, crop).

    Training: shortest side resized to ``S`` (``scale=[S]``) or to an ``S`` drawn per image from
    ``[S_min, S_max]``, random ``crop``, random horizontal flip, optional PCA colour shift, normalisation.
    Evaluation: shortest side resized to ``scale[0]`` (Q), centre crop, normalisation. Resizing is
    torchvision's antialiased bilinear (the tensor path of ``v2.Resize``).
    """

    batched = False

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, crop: int, scale: Sequence[int],
                 train: bool, flip: bool = True, color_shift: float = 0.0, pca: dict[str, Any] | None = None):
        scale = list(scale)
        if len(scale) not in (1, 2) or (len(scale) == 2 and scale[0] > scale[1]):
            raise ConfigError(f"scale={scale}: give [S] or [S_min, S_max] with S_min <= S_max")
        for s in scale:
            _check_scale(s, crop, "train_scale" if train else "test_scale")
        self.mean, self.std = _as_stats(mean, std, len(list(mean)))
        self.crop, self.scale, self.train = crop, scale, train
        self.flip, self.color_shift = flip and train, color_shift if train else 0.0
        pca = pca if pca and "eigval" in pca else IMAGENET_PCA
        self.eigval = torch.as_tensor(pca["eigval"], dtype=torch.float32)
        self.eigvec = torch.as_tensor(pca["eigvec"], dtype=torch.float32)

    def _size(self, generator: torch.Generator | None) -> int:
        lo, hi = self.scale[0], self.scale[-1]
        return lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def _one(self, img: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        img = TF.resize(img, [self._size(generator)], antialias=True)
        if not self.train:
            return TF.center_crop(img, [self.crop, self.crop])
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - self.crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - self.crop + 1, (1,), generator=generator))
        return img[..., top : top + self.crop, left : left + self.crop]

    def __call__(self, images: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.stack([self._one(img, generator) for img in images]).float().div_(255.0)
        b, dev = x.shape[0], x.device
        if self.flip:
            flipped = (torch.rand(b, generator=generator) < 0.5).to(dev).view(b, 1, 1, 1)
            x = torch.where(flipped, x.flip(-1), x)
        if self.color_shift > 0 and x.shape[1] == 3:
            alpha = torch.randn(b, 3, generator=generator) * self.color_shift
            x = x + ((alpha * self.eigval) @ self.eigvec.T).to(dev).view(b, 3, 1, 1)
        return x.sub_(self.mean.to(dev)).div_(self.std.to(dev))

    def __repr__(self) -> str:
        return f"DeviceTransform(crop={self.crop}, scale={self.scale}, train={self.train}, flip={self.flip})"


class DeviceDecodeLoader(FileLoader):
    """A ``FileLoader`` whose workers read bytes; batches are decoded and transformed on ``device``.

    Yields float ``(B, C, crop, crop)`` images and int64 labels, both on ``device``.
    """

    collate = staticmethod(collate_encoded)

    def __init__(self, dataset: Any, transform: DeviceTransform, *, device: str | torch.device = "cuda",
                 batch_size: int, shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, pad_shards: bool = True, **kw: Any) -> None:
        """``build_loader``'s arguments (``pin_memory`` follows ``device``), plus the decoding ``device``."""
        files = EncodedFiles(dataset)
        super().__init__(
            files, None, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
            world_size=world_size, workers=workers, pin_memory=torch.device(device).type == "cuda",
            pad_shards=pad_shards, **kw,
        )  # fmt: skip
        self.files, self.device_transform, self.device = files, transform, torch.device(device)

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self._aug_seed())
        for encoded, labels in super().__iter__():
            items: list[Encoded] = encoded  # type: ignore[assignment]
            images, skipped = decode_batch(items, self.device, self.files.mode, self.files.bad_images)
            if skipped:
                dropped = {s.path for s in skipped}
                labels = labels[torch.tensor([e.path not in dropped for e in items])]
                for s in skipped:
                    log.warning("skipping bad image %s: %s", s.path, s.reason)
                    self.files.skipped[s.path] = s.reason
            if images:
                yield self.device_transform(images, gen), labels.to(self.device, non_blocking=True)


def device_transforms(stats: dict[str, Any], *, image_size: int, train_scale: Sequence[int] | None = None,
                      test_scale: int | None = None, flip: bool = True,
                      color_shift: float = 0.0) -> tuple[DeviceTransform, DeviceTransform]:
    """(train, eval) device transforms with the settings ``transforms.build_transforms`` gives file datasets."""
    scale = train_scales(train_scale, image_size)
    q = eval_scale(train_scale, test_scale, image_size)
    mean, std = stats["mean"], stats["std"]
    train = DeviceTransform(mean, std, crop=image_size, scale=scale, train=True, flip=flip,
                            color_shift=color_shift, pca=stats)
    return train, DeviceTransform(mean, std, crop=image_size, scale=[q], train=False)


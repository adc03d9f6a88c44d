"""Training and evaluation transforms (METHODS.md §1 training scale and preprocessing; torchvision transforms v2).

- Small in-memory images (Fashion-MNIST, CIFAR): :class:`BatchAugment` pads, random-crops and flips a
  whole uint8 batch with one gather (no Python loop over the batch), then normalises; its randomness
  comes from the ``torch.Generator`` the loader passes, seeded by ``(seed, epoch, rank)``.
- Large images (files): VGG training scale: shortest side resized to a fixed ``S`` or to an ``S`` drawn
  per image from ``[S_min, S_max]``, random crop, flip, optional AlexNet-style PCA colour shift, then
  normalisation; evaluation resizes the shortest side to ``Q`` and takes the centre crop.
- Optional recipe augmentations (``data.auto_augment``, ``data.random_erase``, ``data.mixup_alpha``,
  ``data.cutmix_alpha``): torchvision v2 RandAugment / TrivialAugmentWide in the per-image transform or,
  for in-memory batches, on groups of the batch (:class:`BatchAugment`); timm RandomErasing and
  Mixup/CutMix on the normalised training batch on its device (:class:`TrainBatchTransform`, the engine's
  ``FitSetup.batch_transform``).

Normalisation statistics come from the training set (:func:`compute_mean_std`); they are a JSON-able
dict so a checkpoint can store them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from coarse2fine.config import DataConfig
from coarse2fine.data.base import Skipped, resolve_memory
from coarse2fine.errors import ConfigError

AUTO_AUGMENTS = ("rand", "trivial")  # data.auto_augment (config.AutoAugment)
AUTO_AUGMENT_GROUPS = 16  # in-memory batches: one torchvision op draw per group of the batch

# AlexNet / fb.resnet.torch ImageNet RGB eigen-decomposition, used when a dataset's own is not given.
IMAGENET_PCA = {
    "eigval": [0.2175, 0.0188, 0.0045],
    "eigvec": [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
}


def _as_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(list(mean), dtype=torch.float32)
    s = torch.as_tensor(list(std), dtype=torch.float32)
    if m.numel() != channels or s.numel() != channels:
        raise ConfigError(f"normalisation mean/std need {channels} value(s) each, got {m.numel()} and {s.numel()}")
    if bool((s <= 0).any()):
        raise ConfigError(f"normalisation std must be positive, got {s.tolist()}")
    return m.view(1, -1, 1, 1), s.view(1, -1, 1, 1)


def auto_augment_op(kind: str | None, magnitude: int = 9) -> Any:
    """torchvision v2 ``RandAugment(magnitude=...)`` (``rand``), ``TrivialAugmentWide`` (``trivial``) or None."""
    if kind is None:
        return None
    if kind == "rand":
        return v2.RandAugment(magnitude=magnitude)
    if kind == "trivial":
        return v2.TrivialAugmentWide()
    raise ConfigError(f"data.auto_augment: unknown value {kind!r}; choose one of {', '.join(AUTO_AUGMENTS)}, or null")


class BatchAugment:
    """Batched transform of a uint8 batch ``(B, C, H, W)`` into a normalised float batch ``(B, C, S, S)``.

    Training (``train=True``): optional resize to ``size``, zero ``pad``, random ``size`` crop and random
    horizontal flip, all drawn per image from ``generator`` and applied by two gathers; then the optional
    ``auto_augment`` (``rand``: RandAugment, ``trivial``: TrivialAugmentWide, torchvision v2). Evaluation:
    resize to ``size`` when the images have another size, then normalise.

    torchvision v2 draws one operation (and magnitude) per call and applies it to the whole tensor, so a
    batch in one call would get a single op. The batch is therefore split into ``AUTO_AUGMENT_GROUPS``
    groups, each transformed by one call: up to 16 different draws per batch for 16 Python calls, whatever
    the batch size, instead of one call per image (measured on a 128-image CIFAR batch, one thread: ~9 ms
    with 16 groups, ~5 ms with one call). The draws come from a torch seed taken from ``generator``, so the
    ``(seed, epoch, rank)`` replay of the loader holds.
    """

    batched = True

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        size: int,
        train: bool,
        pad: int = 4,
        flip: bool = True,
        auto_augment: str | None = None,
        auto_augment_magnitude: int = 9,
    ) -> None:
        if size < 1 or pad < 0:
            raise ConfigError(f"image_size={size} must be >= 1 and pad={pad} >= 0")
        self.mean, self.std = list(mean), list(std)
        self._mean, self._std = _as_stats(mean, std, len(self.mean))
        self.size, self.train, self.pad, self.flip = size, train, pad if train else 0, flip and train
        self.auto_augment = auto_augment if train else None
        self._aa = auto_augment_op(self.auto_augment, auto_augment_magnitude)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x, scale = images, 255.0
        if x.shape[-2:] != (self.size, self.size):
            x, scale = x.float().div_(255.0), 1.0
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.train and (self.pad or self.flip):
            x = self._crop_flip(x, generator)  # on uint8 when no resize: 4x less memory traffic
        if self._aa is not None:
            x = self._auto_augment(x, generator)  # uint8, or float in [0, 1] after a resize
        # (x / scale - mean) / std in two in-place passes
        return x.float().mul_(1.0 / (scale * self._std)).sub_(self._mean / self._std)

    def _crop_flip(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-image offsets and flips drawn from ``generator``; rows then columns picked by two gathers."""
        b, c, s, p = x.shape[0], x.shape[1], self.size, self.pad
        x = F.pad(x, (p, p, p, p)) if p else x
        oy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
        ox = torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
        ar = torch.arange(s).view(1, s)
        rows = oy + ar
        cols = ox + ar
        if self.flip:
            flipped = torch.rand(b, 1, generator=generator) < 0.5
            cols = torch.where(flipped, ox + (s - 1 - ar), cols)
        x = x.gather(2, rows.view(b, 1, s, 1).expand(b, c, s, x.shape[-1]))
        return x.gather(3, cols.view(b, 1, 1, s).expand(b, c, s, s))

    def _auto_augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One torchvision op draw per group of the batch, under a torch seed drawn from ``generator``."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        gen = torch.default_generator  # v2 transforms draw from it: seed only the CPU generator, then restore
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return torch.cat([self._aa(group) for group in x.tensor_split(min(AUTO_AUGMENT_GROUPS, len(x)))])
        finally:
            gen.set_state(state)

    def __repr__(self) -> str:
        aa = f", auto_augment={self.auto_augment}" if self.auto_augment else ""
        return f"BatchAugment(size={self.size}, train={self.train}, pad={self.pad}, flip={self.flip}{aa})"


class TrainBatchTransform:
    """Training-batch augmentation on the batch's device, after normalisation (``FitSetup.batch_transform``).

    ``random_erase``: timm ``RandomErasing`` (per image with that probability, per-pixel normal noise, as
    timm's training script). ``mixup_alpha`` / ``cutmix_alpha``: timm ``Mixup`` (one lambda per batch, the
    batch mixed with its reverse; ``mix_prob``, ``switch_prob``, ``label_smoothing``): the targets become soft
    ``(B, num_classes)`` rows, which ``CrossEntropyObjective`` takes as timm's ``SoftTargetCrossEntropy``. timm
    mixes even batches only: the last image of an odd batch keeps its own (smoothed) label.
    Randomness: Python's, numpy's and torch's global generators, reseeded by the engine every epoch.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        random_erase: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        from timm.data import Mixup
        from timm.data.mixup import mixup_target
        from timm.data.random_erasing import RandomErasing

        self.num_classes, self.label_smoothing, self._target = num_classes, label_smoothing, mixup_target
        self.erase = RandomErasing(random_erase, mode="pixel", device="cpu") if random_erase > 0 else None
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mix_prob,
                switch_prob=switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )

    @property
    def soft_targets(self) -> bool:
        return self.mixup is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.clone()  # timm works in place: never on a tensor the loader may still hold
        if self.erase is not None:
            self.erase.device = images.device
            images = self.erase(images)
        if self.mixup is None:
            return images, targets
        even = len(images) - len(images) % 2
        if even == 0:
            return images, self._target(targets, self.num_classes, 1.0, self.label_smoothing)
        _, soft = self.mixup(images[:even], targets[:even])  # in place on the first ``even`` images
        if even < len(images):
            soft = torch.cat([soft, self._target(targets[even:], self.num_classes, 1.0, self.label_smoothing)])
        return images, soft

    def __repr__(self) -> str:
        return f"TrainBatchTransform(erase={self.erase!r}, mixup={self.mixup is not None})"


def train_batch_transform(
    data: DataConfig, num_classes: int, label_smoothing: float = 0.0
) -> TrainBatchTransform | None:
    """The batch transform of ``data``'s ``random_erase`` and mixing settings, or None when they are off."""
    if data.random_erase <= 0 and not data.mixing:
        return None
    return TrainBatchTransform(
        num_classes,
        random_erase=data.random_erase,
        mixup_alpha=data.mixup_alpha,
        cutmix_alpha=data.cutmix_alpha,
        mix_prob=data.mix_prob,
        switch_prob=data.mix_switch_prob,
        label_smoothing=label_smoothing,
    )


class PerImage:
    """A batched transform (:class:`BatchAugment`) applied to one image: a PIL image or uint8 ``(C, H, W)``
    tensor of a file dataset of small images, so it gets the augmentation of the in-memory path. Its
    randomness comes from torch's default generator, which the file loader seeds per image."""

    batched = False

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> torch.Tensor:
        x = pil_to_tensor(img) if isinstance(img, Image.Image) else torch.as_tensor(img)
        return self.transform(x[None])[0]

    def __repr__(self) -> str:
        return f"PerImage({self.transform!r})"


class PCAColorShift:
    """AlexNet colour shift: add ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, strength^2)``, to every pixel
    of a float RGB image ``(3, H, W)`` in [0, 1] (METHODS.md §1 "RGB colour shift")."""

    def __init__(self, strength: float, eigval: Sequence[float], eigvec: Sequence[Sequence[float]]) -> None:
        self.strength = float(strength)
        self.eigval = torch.as_tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.as_tensor(eigvec, dtype=torch.float32)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.strength <= 0 or img.shape[-3] != 3:
            return img
        alpha = torch.randn(3) * self.strength
        return img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


class ImageTransform(v2.Compose):
    """Per-image transform (PIL image or CHW tensor -> normalised float tensor)."""

    batched = False


def _check_scale(value: int, crop: int, what: str) -> None:
    if value < crop:
        raise ConfigError(
            f"data.{what}={value} is smaller than the crop image_size={crop}; use a scale >= {crop} "
            f"(--set data.{what}={crop} or more)"
        )


def large_train_transform(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop: int,
    scale: Sequence[int],
    flip: bool = True,
    color_shift: float = 0.0,
    pca: dict[str, Any] | None = None,
    auto_augment: str | None = None,
    auto_augment_magnitude: int = 9,
) -> ImageTransform:
    """VGG training pipeline: ``scale=[S]`` (fixed) or ``[S_min, S_max]`` (jittered per image); then the
    optional ``auto_augment`` (torchvision v2 RandAugment / TrivialAugmentWide on the uint8 crop)."""
    scale = list(scale)
    if len(scale) not in (1, 2) or (len(scale) == 2 and scale[0] > scale[1]):
        raise ConfigError(f"train_scale={scale}: give [S] or [S_min, S_max] with S_min <= S_max")
    for s in scale:
        _check_scale(s, crop, "train_scale")
    resize = (
        v2.Resize(scale[0], antialias=True)
        if len(scale) == 1 or scale[0] == scale[1]
        else (v2.RandomShortestSize(list(range(scale[0], scale[1] + 1)), antialias=True))
    )
    steps: list[Any] = [v2.ToImage(), resize, v2.RandomCrop(crop)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    aa = auto_augment_op(auto_augment, auto_augment_magnitude)
    if aa is not None:
        steps.append(aa)
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if color_shift > 0 and len(list(mean)) == 3:
        pca = pca if pca and "eigval" in pca else IMAGENET_PCA
        steps.append(PCAColorShift(color_shift, pca["eigval"], pca["eigvec"]))
    steps.append(v2.Normalize(list(mean), list(std)))
    return ImageTransform(steps)


def large_eval_transform(mean: Sequence[float], std: Sequence[float], *, crop: int, scale: int) -> ImageTransform:
    """Evaluation: shortest side resized to ``Q = scale``, then the centre ``crop``."""
    _check_scale(scale, crop, "test_scale")
    return ImageTransform(
        [
            v2.ToImage(),
            v2.Resize(scale, antialias=True),
            v2.CenterCrop(crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def train_scales(train_scale: Sequence[int] | None, image_size: int) -> list[int]:
    """The training scale S (``[S]`` fixed, ``[S_min, S_max]`` jittered); default ``round(size * 256 / 224)``."""
    return list(train_scale) if train_scale else [round(image_size * 256 / 224)]


def eval_scale(train_scale: Sequence[int] | None, test_scale: int | None, image_size: int) -> int:
    """The evaluation resize Q of a file dataset: ``test_scale``, else S (fixed) or (S_min + S_max) // 2."""
    if test_scale is not None:
        return test_scale
    scale = train_scales(train_scale, image_size)
    return scale[0] if len(scale) == 1 else (scale[0] + scale[-1]) // 2


MAX_SIDE = 8192  # pixels an image side is resized, cropped or padded to (at most)


def build_transforms(
    stats: dict[str, Any],
    *,
    in_memory: bool,
    image_size: int,
    train_scale: Sequence[int] | None = None,
    test_scale: int | None = None,
    pad: int = 4,
    flip: bool = True,
    color_shift: float = 0.0,
    auto_augment: str | None = None,
    auto_augment_magnitude: int = 9,
) -> tuple[Any, Any]:
    """(train, eval) transforms for a dataset, from :func:`compute_mean_std` ``stats``.

    In-memory datasets get :class:`BatchAugment` (``pad``, ``flip``); file datasets the VGG scale
    pipeline, where ``train_scale`` defaults to ``[round(image_size * 256 / 224)]`` and ``test_scale`` to S
    (fixed) or ``(S_min + S_max) // 2`` (jittered). ``auto_augment`` (``rand`` | ``trivial`` | None) is
    added to both training pipelines.
    """
    sides = [("image_size", image_size), ("test_scale", test_scale), ("pad", pad)]
    for what, v in sides + [("train_scale", s) for s in train_scale or []]:
        if v is not None and v > MAX_SIDE:  # resizing or padding to it would exhaust memory at the first batch
            raise ConfigError(f"data.{what}={v} is over {MAX_SIDE} pixels; --set data.{what}=... (at most {MAX_SIDE})")
    mean, std = stats["mean"], stats["std"]
    aa = {"auto_augment": auto_augment, "auto_augment_magnitude": auto_augment_magnitude}
    if in_memory:
        return (
            BatchAugment(mean, std, size=image_size, train=True, pad=pad, flip=flip, **aa),
            BatchAugment(mean, std, size=image_size, train=False),
        )
    scale = train_scales(train_scale, image_size)
    train = large_train_transform(
        mean, std, crop=image_size, scale=scale, flip=flip, color_shift=color_shift, pca=stats, **aa
    )
    q = eval_scale(train_scale, test_scale, image_size)
    return train, large_eval_transform(mean, std, crop=image_size, scale=q)


def _pixels_of_files(dataset: Any, max_samples: int, seed: int, thumb: int) -> list[np.ndarray]:
    """(C, P) float arrays of up to ``max_samples`` images, each shrunk to at most ``thumb`` px a side."""
    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n)[: min(n, max_samples)]
    out = []
    for i in order:
        item = dataset[int(i)]
        if isinstance(item, Skipped):
            continue
        img = item[0].copy()
        img.thumbnail((thumb, thumb))
        arr = np.asarray(img, dtype=np.float64) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out.append(arr.reshape(arr.shape[0], -1))
    return out


def compute_mean_std(
    dataset: Any, *, max_samples: int = 1000, seed: int = 0, thumb: int = 128, chunk: int = 4096
) -> dict[str, Any]:
    """Per-channel mean and std of the training images in [0, 1], and their RGB eigen-decomposition.

    In-memory datasets use every image (in chunks); file datasets a seeded sample of ``max_samples``
    images shrunk to ``thumb`` pixels a side. Returns a JSON-able dict ``{"mean", "std", "eigval",
    "eigvec", "num_images"}`` (``eigval``/``eigvec``, the eigen-decomposition of the RGB covariance that
    AlexNet's colour shift uses, for 3 channels only). A std is at least 1/255, so a constant channel does not
    blow up the normalisation.
    """
    total = None
    count = 0
    outer = None
    num_images = 0

    def add(pix: torch.Tensor) -> None:  # pix: (C, P) float64
        nonlocal total, outer, count
        total = pix.sum(1) if total is None else total + pix.sum(1)
        outer = pix @ pix.T if outer is None else outer + pix @ pix.T
        count += pix.shape[1]

    if getattr(dataset, "in_memory", False):
        images, idx = resolve_memory(dataset)
        n = images.shape[0] if idx is None else idx.size
        for start in range(0, n, chunk):
            sel = slice(start, start + chunk) if idx is None else torch.from_numpy(idx[start : start + chunk])
            batch = images[sel].to(torch.float64).div_(255.0)
            add(batch.transpose(0, 1).reshape(batch.shape[1], -1))
        num_images = int(n)
    else:
        arrays = _pixels_of_files(dataset, max_samples, seed, thumb)
        for arr in arrays:
            add(torch.from_numpy(arr))
        num_images = len(arrays)
    if total is None or outer is None or count == 0:
        raise ConfigError(f"cannot compute normalisation statistics of {dataset!r}: no readable images")
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    std = cov.diagonal().clamp_min(0).sqrt().clamp_min(1 / 255)  # a constant channel: one grey level
    stats: dict[str, Any] = {"mean": mean.tolist(), "std": std.tolist(), "num_images": num_images}
    if mean.numel() == 3:
        eigval, eigvec = torch.linalg.eigh(cov)
        order = torch.argsort(eigval, descending=True)
        stats["eigval"] = eigval[order].clamp_min(0).tolist()
        stats["eigvec"] = eigvec[:, order].tolist()
    return stats

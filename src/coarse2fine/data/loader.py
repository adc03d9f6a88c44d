"""``build_loader``: the loader contract of ``docs/ARCHITECTURE.md``.

Shuffling draws one permutation from a generator seeded by ``(seed, epoch)``, identical on every rank;
rank ``r`` of ``w`` takes ``perm[r::w]``, padded by repeating to equal length when ``pad_shards=True``
(training, DDP needs equal step counts) or exact when ``False`` (evaluation: disjoint shards covering the
split once). Augmentation draws from ``(seed, epoch, rank)``, so an epoch replays identically after a
resume, whatever the number of workers.

- In-memory datasets with a batched transform: the main process slices the uint8 tensor and augments the
  whole batch at once (no workers, no per-image Python work).
- Everything else: a torch ``DataLoader`` with (persistent) workers. Each sample carries its own
  augmentation seed, drawn from ``(seed, epoch, rank)``. A worker that dies or hangs becomes a DataError.
  Images skipped under ``bad_images="skip"`` are left out of their batch and recorded in
  ``dataset.skipped``.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from coarse2fine.data.base import Skipped, resolve_memory
from coarse2fine.data.transforms import PerImage
from coarse2fine.errors import C2FError, ConfigError, DataError

log = logging.getLogger(__name__)
MAX_WORKERS = 256  # loader processes per training process

Batch = tuple[torch.Tensor, torch.Tensor]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integer parts (numpy SeedSequence)."""
    if any(p < 0 for p in parts):
        raise ConfigError(f"seed parts must be >= 0, got {parts}")
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def shard_indices(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int, pad: bool) -> np.ndarray:
    """This rank's indices for ``epoch``: ``perm[rank::world_size]`` of a (seed, epoch) permutation."""
    if shuffle:
        gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
        perm = torch.randperm(n, generator=gen).numpy()
    else:
        perm = np.arange(n)
    if pad and n and n % world_size:
        total = math.ceil(n / world_size) * world_size
        perm = np.resize(perm, total)  # repeats from the start
    return perm[rank::world_size]


class _Loader:
    """Common part: epoch, sharding and sizes."""

    def __init__(
        self,
        dataset: Any,
        transform: Any,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int,
        world_size: int,
        pin_memory: bool,
        pad_shards: bool,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if seed < 0:
            raise ConfigError(f"seed={seed} must be >= 0")
        if len(dataset) == 0:
            raise DataError(f"{dataset!r}: the dataset is empty")
        self.dataset, self.transform = dataset, transform
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.pad_shards = seed, rank, world_size, pad_shards
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.epoch = 0
        n = len(dataset)
        self.num_samples = math.ceil(n / world_size) if pad_shards else len(range(rank, n, world_size))
        if drop_last and self.num_samples < batch_size:
            # dropping the last partial batch would leave an empty epoch: keep it (same on every rank)
            log.warning(
                "%s: %d image(s) per process is fewer than batch_size=%d; each epoch is one smaller batch",
                getattr(dataset, "source", dataset),
                self.num_samples,
                batch_size,
            )
            self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling and augmentation for ``epoch`` (call before iterating)."""
        if epoch < 0:
            raise ConfigError(f"epoch={epoch} must be >= 0")
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        seed, epoch, rank, world = self.seed, self.epoch, self.rank, self.world_size
        n, shuffle, pad = len(self.dataset), self.shuffle, self.pad_shards
        return shard_indices(n, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world, pad=pad)

    def batches(self) -> list[np.ndarray]:
        idx = self.indices()
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        return [idx[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _aug_seed(self) -> int:
        return derive_seed(self.seed, self.epoch, self.rank + 1)


class InMemoryLoader(_Loader):
    """Fast path: uint8 tensor slices augmented a whole batch at a time in the main process."""

    def __init__(self, dataset: Any, transform: Any, **kw: Any) -> None:
        super().__init__(dataset, transform, **kw)
        self.images, self.base_index = resolve_memory(dataset)
        self.targets = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self._aug_seed())
        for idx in self.batches():
            src = idx if self.base_index is None else self.base_index[idx]
            images = self.images[torch.from_numpy(src)]
            x = self.transform(images, generator=gen) if self.transform is not None else images.float().div_(255)
            y = self.targets[torch.from_numpy(idx)]
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y


class _Seeded(torch.utils.data.Dataset):
    """Applies ``transform`` to ``dataset[index]`` under the sample's own torch seed."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        item = self.dataset[index]
        if isinstance(item, Skipped) or self.transform is None:
            return item
        image, label = item
        # seed only the CPU generator (torch.manual_seed also queues CUDA/MTIA seeding, ~1 ms a call)
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            gen.set_state(state)


class _BatchSampler:
    """Batches of ``(index, augmentation seed)`` for the owning loader's current epoch."""

    def __init__(self, owner: FileLoader) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        owner = self.owner
        batches = owner.batches()
        total = sum(len(b) for b in batches)
        rng = np.random.default_rng(owner._aug_seed())
        seeds = rng.integers(0, 2**63 - 1, size=total, dtype=np.int64).tolist()
        pos = 0
        for b in batches:
            yield [(int(i), seeds[pos + k]) for k, i in enumerate(b.tolist())]
            pos += len(b)

    def __len__(self) -> int:
        return len(self.owner)


def _collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[Skipped]]:
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    images = [pil_to_tensor(img) if isinstance(img, Image.Image) else torch.as_tensor(img) for img, _ in good]
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DataError(
            f"images in one batch have different shapes {sorted(shapes)}; use a transform that "
            "crops or resizes every image to one size"
        )
    return torch.stack(images), torch.as_tensor([int(y) for _, y in good], dtype=torch.int64), skipped


def _worker_init(worker_id: int) -> None:
    """One thread per worker: the main process owns the cores for compute. (torch's DataLoader already
    seeds each worker's torch, numpy and Python generators; our transforms are reseeded per sample.)"""
    torch.set_num_threads(1)


_ORIGINAL = re.compile(r"^coarse2fine\.errors\.\w+: (.*)$", re.MULTILINE)


class FileLoader(_Loader):
    """torch ``DataLoader`` path for file datasets (or any per-image transform)."""

    collate = staticmethod(_collate)  # items -> (images, labels, skipped); subclasses may batch otherwise

    def __init__(
        self,
        dataset: Any,
        transform: Any,
        *,
        workers: int = 0,
        timeout: float = 120.0,
        mp_context: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(dataset, transform, **kw)
        if not 0 <= workers <= MAX_WORKERS:
            raise ConfigError(f"data.workers={workers} must be in [0, {MAX_WORKERS}] (loader processes)")
        self.workers, self.timeout = workers, timeout
        self._loader = torch.utils.data.DataLoader(
            _Seeded(dataset, transform),
            batch_sampler=_BatchSampler(self),
            num_workers=workers,
            collate_fn=self.collate,
            pin_memory=self.pin_memory,
            timeout=timeout if workers else 0,
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers else None,
            multiprocessing_context=mp_context if workers else None,
            generator=torch.Generator().manual_seed(derive_seed(self.seed, self.rank)),  # not the global one
        )

    def __iter__(self) -> Iterator[Batch]:
        starting = bool(self.workers) and getattr(self._loader, "_iterator", None) is None
        if starting:
            # forked workers share the parent's heap copy-on-write; freezing the objects that exist now keeps
            # the workers' garbage collector from touching (and so copying) those pages
            gc.collect()
            gc.freeze()
        try:
            it = iter(self._loader)  # forks the persistent workers the first time
        finally:
            if starting:
                gc.unfreeze()  # the workers keep their frozen copy; the parent collects (and drops loaders) again
        while True:
            try:
                images, labels, skipped = next(it)
            except StopIteration:
                return
            except C2FError as exc:
                # an error raised in a worker arrives wrapped in the worker's traceback: keep its message
                found = _ORIGINAL.findall(str(exc))
                raise type(exc)(found[-1] if found else str(exc)) from None
            except RuntimeError as exc:
                text = str(exc)
                if "DataLoader worker" in text or "timed out" in text:
                    source = getattr(self.dataset, "source", self.dataset)
                    raise DataError(
                        f"a data loading worker failed while reading {source}"
                        f" ({text}); rerun with workers=0 to see the error in the main process"
                    ) from None
                raise
            skipped_log = getattr(self.dataset, "skipped", None)
            for s in skipped:
                if isinstance(skipped_log, dict):
                    skipped_log[s.path] = s.reason
            if labels.numel():
                yield images, labels


def build_loader(
    dataset: Any,
    transform: Any,
    *,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
    pad_shards: bool = True,
    timeout: float = 120.0,
    mp_context: str | None = None,
) -> InMemoryLoader | FileLoader:
    """A loader for ``dataset`` (see the module docstring and ARCHITECTURE.md "Loader contract").

    ``transform`` is a batched transform (``transform.batched``, e.g. BatchAugment) for in-memory datasets
    (applied one image at a time, :class:`~coarse2fine.data.transforms.PerImage`, to a file dataset), or a
    per-image transform. ``timeout`` (seconds) bounds the wait for one batch from a worker.
    """
    common = dict(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank)
    common.update(world_size=world_size, pin_memory=pin_memory, pad_shards=pad_shards)
    if getattr(dataset, "in_memory", False) and (transform is None or getattr(transform, "batched", False)):
        return InMemoryLoader(dataset, transform, **common)
    if getattr(transform, "batched", False):  # small images read from files: the same augmentation per image
        transform = PerImage(transform)
    return FileLoader(dataset, transform, workers=workers, timeout=timeout, mp_context=mp_context, **common)

"""Stratified, seeded held-out split of a training set (METHODS.md §2.1 step 1: a class-balanced held-out part).

The held-out part is used for model selection and for HD-CNN's confusion matrix; the test split is
never touched. Both parts are :class:`~coarse2fine.data.base.DatasetView` objects keeping ``classes`` and
``targets``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coarse2fine.config import quote
from coarse2fine.data.base import DatasetView, check_class_names, check_labels, subset
from coarse2fine.errors import ConfigError, DataError


def stratified_split(
    dataset: Any,
    val_fraction: float | None = 0.1,
    *,
    per_class: int | None = None,
    seed: int = 0,
) -> tuple[DatasetView, DatasetView]:
    """Split ``dataset`` into (train, held-out) views, class by class.

    Each class ``c`` with ``n_c`` images gives ``round(val_fraction * n_c)`` (at least 1) images, or
    ``per_class`` images, to the held-out part, chosen by a generator seeded with ``seed``; both parts
    keep at least one image of every class. Raises DataError for an empty dataset, labels out of range,
    duplicate class names, or a class with too few images to split.
    """
    if per_class is None:
        if val_fraction is None or not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction={quote(val_fraction)} must be in (0, 1)")
    elif per_class < 1:
        raise ConfigError(f"per_class={quote(per_class)} must be >= 1")
    source = getattr(dataset, "source", repr(dataset))
    classes = check_class_names(list(dataset.classes), source)
    targets = check_labels(dataset.targets, len(classes), source)
    if targets.size == 0:
        raise DataError(f"{source}: cannot split an empty dataset")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in range(len(classes)):
        members = np.flatnonzero(targets == c)
        n = members.size
        if n == 0:
            continue
        k = per_class if per_class is not None else max(1, round(float(val_fraction) * n))
        if n < 2 or k >= n:
            need = k + 1 if per_class is not None else 2
            raise DataError(
                f"{source}: class {classes[c]!r} has {n} image(s), too few to split "
                f"(needs at least {need} to keep one on each side)"
            )
        members = rng.permutation(members)
        val_idx.append(members[:k])
        train_idx.append(members[k:])
    train = np.sort(np.concatenate(train_idx))
    val = np.sort(np.concatenate(val_idx))
    return subset(dataset, train), subset(dataset, val)


def limit(dataset: Any, n: int | None, *, seed: int = 0) -> Any:
    """At most ``n`` images of ``dataset``, drawn class-balanced (round-robin over classes) with ``seed``.

    ``None`` or ``n >= len(dataset)`` returns the dataset unchanged. Used for quick runs (``limit_train``).
    """
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ConfigError(f"limit={quote(n)} must be >= 1")
    rng = np.random.default_rng(seed)
    targets = np.asarray(dataset.targets)
    # rank each image within its class in a random order; take the lowest ranks first
    order = rng.permutation(targets.size)
    rank = np.empty(targets.size, dtype=np.int64)
    for c in np.unique(targets):
        members = order[targets[order] == c]
        rank[members] = np.arange(members.size)
    chosen = np.lexsort((rng.random(targets.size), rank))[:n]
    return subset(dataset, np.sort(chosen))


def carve_test(targets: Any, classes: list[str], fraction: float, *, seed: int = 0, source: str = "data") -> np.ndarray:
    """A stratified, seeded test part of a tree that has none: a boolean mask, True for test images.

    Each class ``c`` with ``n_c`` images gives ``round(fraction * n_c)`` of them (drawn with
    ``np.random.default_rng([seed, 1])``). A class left with no test image or no training image is a
    DataError naming it, its count and ``data.test_fraction``.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.test_fraction={fraction!r} must be in (0, 1)")
    targets = check_labels(targets, len(classes), source)
    rng = np.random.default_rng([seed, 1])
    test = np.zeros(targets.size, dtype=bool)
    for c, name in enumerate(classes):
        members = np.flatnonzero(targets == c)
        n = members.size
        k = int(np.floor(fraction * n + 0.5))
        if k == 0 or k == n:
            side = "no test image" if k == 0 else "no training image"
            raise DataError(
                f"{source}: data.test_fraction={fraction:g} leaves class {name!r} ({n} image(s)) with {side}; "
                f"give it more images, choose another data.test_fraction, or give data.split_file"
            )
        test[rng.permutation(members)[:k]] = True
    return test

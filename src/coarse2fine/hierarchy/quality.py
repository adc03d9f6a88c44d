"""How good a partition of the classes is (METHODS.md §2.1, eqs. (11a), (11b)). Plain numpy.

``confusion_kept``: the share of the off-diagonal (symmetrised) confusion that stays inside the coarse
groups, eq. (11a) -- the errors a group's fine component can work on. ``normalised_cut``: the
normalised cut of the partition on the clustering affinity, eq. (11b) -- what spectral clustering
minimises (relaxed). ``near_isolated``: classes with almost no confusion, which distort the spectral
embedding. ``quality_warnings``: the partitions worth a second look.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from coarse2fine.errors import HierarchyError

log = logging.getLogger(__name__)

LOW_KEPT = 0.5  # warn below this share of the confusion kept inside groups
ISOLATION = 0.25  # near-isolated: total off-diagonal confusion below this fraction of the median class's


def _square(m: ArrayLike, what: str) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise HierarchyError(f"{what} must be square, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise HierarchyError(f"{what} holds NaN or infinite values")
    return a


def _labels(labels: ArrayLike, c: int) -> np.ndarray:
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != c:
        raise HierarchyError(f"partition has {lab.shape[0]} labels for {c} classes")
    return lab


def symmetrised_confusion(F: ArrayLike) -> np.ndarray:
    """``(F + F^T) / 2`` with a zero diagonal: how often two classes are mistaken for each other."""
    f = _square(F, "confusion matrix")
    s = 0.5 * (f + f.T)
    np.fill_diagonal(s, 0.0)
    return s


def confusion_kept(F: ArrayLike, labels: ArrayLike) -> float:
    """Eq. (11a): sum of ``(F_ij + F_ji)/2`` over pairs i != j in the same group / the same sum over all
    pairs i != j. In [0, 1]; NaN when there is no off-diagonal confusion at all (every grouping ties).
    """
    s = symmetrised_confusion(F)
    lab = _labels(labels, s.shape[0])
    total = float(s.sum())
    if total <= 0.0:
        return math.nan
    return float(s[lab[:, None] == lab[None, :]].sum() / total)


def normalised_cut(A: ArrayLike, labels: ArrayLike) -> float:
    """Eq. (11b): ``sum_k cut(G_k, rest) / vol(G_k)`` on the affinity ``A`` (self-affinities ignored, as
    in the graph Laplacian). In [0, K]; a group with no affinity at all (vol 0) adds 0.
    """
    a = _square(A, "affinity")
    a = 0.5 * (a + a.T)
    np.fill_diagonal(a, 0.0)
    lab = _labels(labels, a.shape[0])
    degree = a.sum(axis=1)
    total = 0.0
    for k in np.unique(lab):
        inside = lab == k
        vol = float(degree[inside].sum())
        if vol > 0.0:
            total += float(a[np.ix_(inside, ~inside)].sum()) / vol
    return total


def partition_quality(F: ArrayLike, A: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    """``confusion_kept`` (11a), ``ncut`` (11b), ``num_groups`` and ``group_sizes`` of a partition."""
    lab = np.asarray(labels).reshape(-1)
    _, sizes = np.unique(lab, return_counts=True)
    return {
        "confusion_kept": confusion_kept(F, lab),
        "ncut": normalised_cut(A, lab),
        "num_groups": int(sizes.size),
        "group_sizes": sorted((int(n) for n in sizes), reverse=True),
    }


def near_isolated(F: ArrayLike, ratio: float = ISOLATION) -> np.ndarray:
    """Classes whose total off-diagonal symmetrised confusion is below ``ratio`` times the median class's,
    least confused first. Such a class carries almost no evidence of where it belongs.
    """
    degree = symmetrised_confusion(F).sum(axis=1)
    if degree.size == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.flatnonzero(degree < ratio * float(np.median(degree)))
    return idx[np.argsort(degree[idx], kind="stable")].astype(np.int64)


def quality_warnings(
    quality: Mapping[str, Any], num_classes: int, num_coarse: int, *, label: str = "", low: float = LOW_KEPT
) -> list[str]:
    """Log (``logging.warning``) and return what is doubtful about a partition: K at least half the
    classes (most groups then hold one or two classes), or less than ``low`` of the confusion kept.
    """
    where = f" ({label})" if label else ""
    out = []
    if num_coarse > 1 and 2 * num_coarse >= num_classes:
        out.append(
            f"K={num_coarse} coarse categories for {num_classes} classes{where}: at least half the classes, "
            "so most groups hold one or two classes"
        )
    kept = quality.get("confusion_kept")
    if kept is None or (isinstance(kept, float) and math.isnan(kept)):
        out.append(f"no off-diagonal confusion{where}: the grouping is arbitrary")
    elif kept < low:
        out.append(
            f"the partition{where} keeps only {100 * kept:.1f} % of the off-diagonal confusion inside its "
            f"groups (below {100 * low:.0f} %): the fine components will see few of the block's mistakes"
        )
    for msg in out:
        log.warning("hierarchy: %s", msg)
    return out


"""Picture of a learnt hierarchy (METHODS.md §2.1 step 5): the class matrix ordered by coarse category."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from numpy.typing import ArrayLike

from coarse2fine.errors import HierarchyError
from coarse2fine.hierarchy.structure import Hierarchy


def class_order(h: Hierarchy) -> np.ndarray:
    """Fine-class indices sorted by coarse category (stable within a category)."""
    return np.argsort(np.asarray(h.coarse_of), kind="stable")


def quality_line(h: Hierarchy) -> str:
    """``meta["quality"]`` (METHODS.md eqs. (11a), (11b)) in words, e.g. for a picture's subtitle; '' if absent."""
    q = h.meta.get("quality")
    if not isinstance(q, dict) or q.get("confusion_kept") is None:
        return ""
    line = f"confusion kept inside groups {100 * q['confusion_kept']:.1f} %, normalised cut {q['ncut']:.3f}"
    chosen = (h.meta.get("selection") or {}).get("chosen")
    return line + (f"\n{h.meta.get('method', 'auto')}: {chosen}" if chosen else "")


def plot_hierarchy(h: Hierarchy, F_or_D: ArrayLike, path: str | Path, *, title: str | None = None) -> Path:
    """Save a PNG: left, the (C, C) confusion or distance matrix with rows and columns ordered by coarse
    category and each disjoint group outlined; right, the partial sets ``S_k`` (own classes dark,
    overlapping ones light). Class names label the axes when there are at most 120 classes. The title's
    second line gives the partition's quality (:func:`quality_line`) when ``h.meta`` has it.
    """
    m = np.asarray(F_or_D, dtype=np.float64)
    c = h.num_classes
    if m.shape != (c, c):
        raise HierarchyError(f"plot_hierarchy: matrix shape {m.shape} does not match {c} classes")
    order = class_order(h)
    mo = m[np.ix_(order, order)]
    names = [h.class_names[j] for j in order]
    k = h.num_coarse
    member = np.zeros((k, c))
    for kk, s in enumerate(h.partial_sets):
        member[kk, s] = 0.5
    member[np.asarray(h.coarse_of), np.arange(c)] = 1.0
    member = member[:, order]

    size = min(4 + 0.12 * c, 30)
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(size * 1.6, size), gridspec_kw={"width_ratios": [1, 0.6]}, squeeze=True
    )
    im = ax.imshow(mo, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    counts = np.bincount(np.asarray(h.coarse_of), minlength=k)
    start = 0
    for kk in range(k):
        n = int(counts[kk])
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), n, n, fill=False, edgecolor="red", linewidth=1.5))
        start += n
    ax2.imshow(member.T, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax2.set_xticks(range(k))
    ax2.set_xticklabels(h.coarse_names, rotation=90, fontsize=7)
    ax2.set_title("partial sets S_k")
    if c <= 120:
        fs = max(4, min(9, int(600 / max(c, 1))))
        for a in (ax, ax2):
            a.set_yticks(range(c))
            a.set_yticklabels(names, fontsize=fs)
        ax.set_xticks(range(c))
        ax.set_xticklabels(names, rotation=90, fontsize=fs)
    head = title or f"{c} classes in {k} coarse categories ({h.meta.get('method', 'given')})"
    sub = quality_line(h)
    ax.set_title(f"{head}\n{sub}" if sub else head, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path

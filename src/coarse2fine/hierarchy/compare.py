"""Comparing a learnt hierarchy with a reference taxonomy (METHODS.md §2.1 step 5), with scikit-learn metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics

from coarse2fine.errors import HierarchyError
from coarse2fine.hierarchy.structure import Hierarchy


def reference_coarse_of(reference: Mapping[str, Sequence[str]], class_names: Sequence[str]) -> np.ndarray:
    """Coarse index (order of ``reference``'s keys) of each class in ``class_names``; -1 if absent.

    A class listed under two reference groups is an error.
    """
    group_of: dict[str, int] = {}
    for g, (coarse, fine) in enumerate(reference.items()):
        for name in fine:
            if name in group_of and group_of[name] != g:
                raise HierarchyError(
                    f"reference hierarchy lists class {name!r} under two groups (incl. {coarse!r})"
                )
            group_of[name] = g
    return np.array([group_of.get(str(n), -1) for n in class_names], dtype=np.int64)


def compare_to_reference(h: Hierarchy, reference: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Agreement of ``h``'s disjoint groups with ``reference`` (``{coarse: [fine, ...]}``).

    Compared on the classes present in both. Returns ``ari`` (adjusted Rand index), ``nmi``
    (normalised mutual information), ``ami``, ``homogeneity``, ``completeness``, ``purity`` (fraction
    of classes whose learnt group's majority reference group is theirs), the group counts and the
    classes left out (``missing_from_reference``, ``unknown_in_reference``).
    """
    ref = reference_coarse_of(reference, h.class_names)
    known = ref >= 0
    if not known.any():
        raise HierarchyError("the reference hierarchy shares no class name with the learnt hierarchy")
    learnt = np.asarray(h.coarse_of, dtype=np.int64)[known]
    truth = ref[known]
    contingency = metrics.cluster.contingency_matrix(truth, learnt)
    in_h = set(h.class_names)
    return {
        "ari": float(metrics.adjusted_rand_score(truth, learnt)),
        "nmi": float(metrics.normalized_mutual_info_score(truth, learnt)),
        "ami": float(metrics.adjusted_mutual_info_score(truth, learnt)),
        "homogeneity": float(metrics.homogeneity_score(truth, learnt)),
        "completeness": float(metrics.completeness_score(truth, learnt)),
        "purity": float(contingency.max(axis=0).sum() / contingency.sum()),
        "num_coarse": h.num_coarse,
        "reference_num_coarse": len(reference),
        "classes_compared": int(known.sum()),
        "missing_from_reference": [n for n, k in zip(h.class_names, known) if not k],
        "unknown_in_reference": sorted({n for fine in reference.values() for n in fine} - in_h),
    }


def mistake_severity(
    pred: ArrayLike,
    target: ArrayLike,
    reference: Hierarchy | Mapping[str, Sequence[str]] | Sequence[int] | np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """How bad the classifier's mistakes are with respect to a coarse grouping.

    ``reference`` is a :class:`Hierarchy`, a ``{coarse: [fine]}`` taxonomy (needs ``class_names``),
    or a fine -> coarse index array. Returns the error count and rate, how many errors cross coarse
    groups (``cross_fraction`` of the errors) or stay inside one (``within_fraction``), and the
    coarse accuracy (prediction in the target's group). Classes absent from the taxonomy are ignored.
    """
    p = np.asarray(pred, dtype=np.int64).reshape(-1)
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    if p.shape != t.shape:
        raise HierarchyError(f"{p.shape[0]} predictions but {t.shape[0]} targets")
    if isinstance(reference, Hierarchy):
        cof = np.asarray(reference.coarse_of, dtype=np.int64)
    elif isinstance(reference, Mapping):
        if class_names is None:
            raise HierarchyError("mistake_severity: a {coarse: [fine]} reference needs class_names")
        cof = reference_coarse_of(reference, class_names)
    else:
        cof = np.asarray(reference, dtype=np.int64)
    if p.size and max(p.max(), t.max()) >= cof.shape[0]:
        raise HierarchyError(f"class index {max(p.max(), t.max())} outside the {cof.shape[0]}-class grouping")
    keep = (cof[t] >= 0) & (cof[p] >= 0)
    p, t = p[keep], t[keep]
    wrong = p != t
    cross = cof[p] != cof[t]
    n_err = int(wrong.sum())
    n_cross = int((wrong & cross).sum())
    n = int(t.shape[0])
    return {
        "samples": n,
        "errors": n_err,
        "error_rate": n_err / n if n else 0.0,
        "cross_group_errors": n_cross,
        "cross_fraction": n_cross / n_err if n_err else 0.0,
        "within_fraction": (n_err - n_cross) / n_err if n_err else 0.0,
        "coarse_accuracy": float((~cross).mean()) if n else 0.0,
    }

"""Learning HD-CNN's category hierarchy from a building block's held-out predictions (METHODS.md §2.1).

Steps 2-4 of METHODS.md §2.1: confusion matrix ``F`` -> distance ``D`` -> disjoint clustering ``P^d`` (scored
by eqs. (11a), (11b), ``hierarchy/quality.py``) -> memberships ``u_k(j)`` -> overlapping partial sets ``S_k``.
Plain numpy / scikit-learn.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.cluster import AffinityPropagation, AgglomerativeClustering, SpectralClustering
from sklearn.exceptions import ConvergenceWarning
from sklearn.manifold import SpectralEmbedding

from coarse2fine.errors import HierarchyError
from coarse2fine.hierarchy.quality import (
    ISOLATION,
    near_isolated,
    partition_quality,
    quality_warnings,
)
from coarse2fine.hierarchy.structure import Hierarchy, default_coarse_names

log = logging.getLogger(__name__)

CLUSTERING_METHODS = ("auto", "spectral", "affinity", "agglomerative")  # METHODS.md §2.1 step 3; "auto": the default
AFFINITIES = ("confusion", "gaussian")
TOLERANCE = 0.01  # "auto": shares of kept confusion closer than this to the best count as tied
Candidate = tuple[str, "np.ndarray | None", "str | None"]  # name, labels (None: failed), error


def _as_targets(targets: ArrayLike, num_classes: int) -> np.ndarray:
    t = np.asarray(targets).astype(np.int64).reshape(-1)
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise HierarchyError(f"targets must lie in 0..{num_classes - 1}, got values {t.min()}..{t.max()}")
    return t


def _as_probs(probs: ArrayLike, targets: np.ndarray, num_classes: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise HierarchyError(f"probabilities must have shape (N, {num_classes}), got {p.shape}")
    if p.shape[0] != targets.shape[0]:
        raise HierarchyError(f"{p.shape[0]} probability rows but {targets.shape[0]} targets")
    return p


def confusion_matrix(
    predictions_or_probs: ArrayLike, targets: ArrayLike, num_classes: int, *, soft: bool = False
) -> np.ndarray:
    """Row-normalised confusion matrix ``F`` (METHODS.md §2.1 step 2): ``F_ij`` = fraction of class i predicted j.

    ``predictions_or_probs`` is either predicted labels ``(N,)`` or scores ``(N, C)`` (arg-max taken;
    with ``soft=True`` the probabilities themselves are averaged). A class with no sample gets a zero
    row (logged): it is then never confused with anything.
    """
    t = _as_targets(targets, num_classes)
    x = np.asarray(predictions_or_probs)
    if x.ndim == 2:
        p = _as_probs(x, t, num_classes)
        contrib = p if soft else np.eye(num_classes)[p.argmax(axis=1)]
    elif x.ndim == 1:
        if x.shape[0] != t.shape[0]:
            raise HierarchyError(f"{x.shape[0]} predictions but {t.shape[0]} targets")
        pred = _as_targets(x, num_classes)
        contrib = np.eye(num_classes)[pred]
    else:
        raise HierarchyError(f"predictions must be (N,) labels or (N, C) scores, got shape {x.shape}")
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, t, contrib)
    rows = counts.sum(axis=1, keepdims=True)
    missing = np.flatnonzero(rows[:, 0] == 0)
    if missing.size:
        log.warning("confusion matrix: no held-out sample for class(es) %s", missing.tolist())
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def distance_matrix(F: ArrayLike) -> np.ndarray:
    """Class distance ``D = 1/2 [(J - F) + (J - F)^T]`` with zero diagonal (METHODS.md §2.1 step 2).

    The paper writes ``I``; read literally (identity) every off-diagonal "distance" would be
    ``-(F_ij + F_ji)/2 <= 0``. We use the all-ones ``J``, which only adds 1 to every off-diagonal
    entry (same ordering, same clustering) and gives a proper distance in [0, 1]: 0 = always confused,
    1 = never confused.
    """
    f = np.asarray(F, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] != f.shape[1]:
        raise HierarchyError(f"confusion matrix must be square, got shape {f.shape}")
    d = 1.0 - 0.5 * (f + f.T)
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, None)


def _check_distance(D: ArrayLike) -> np.ndarray:
    d = np.asarray(D, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise HierarchyError(f"distance matrix must be square, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise HierarchyError("distance matrix holds NaN or infinite values")
    return 0.5 * (d + d.T)


def spectral_affinity(D: ArrayLike, kind: str = "confusion", sigma: float | None = None) -> np.ndarray:
    """Affinity for spectral clustering (METHODS.md §2.1 step 3).

    ``confusion`` (default): ``A = 1 - D`` off the diagonal, i.e. the symmetrised confusion
    ``(F_ij + F_ji)/2``, plus a 1e-6 floor so that the graph is connected.
    ``gaussian``: ``A = exp(-D^2 / (2 sigma^2))`` with ``sigma`` the median off-diagonal distance.
    """
    d = _check_distance(D)
    off = ~np.eye(d.shape[0], dtype=bool)
    if kind == "confusion":
        a = np.clip(1.0 - d, 0.0, None) + 1e-6
    elif kind == "gaussian":
        if sigma is None:
            sigma = float(np.median(d[off])) if off.any() else 1.0
        sigma = max(float(sigma), 1e-12)
        a = np.exp(-(d**2) / (2.0 * sigma**2))
    else:
        raise HierarchyError(f"unknown affinity {kind!r}; choose one of {', '.join(AFFINITIES)}")
    np.fill_diagonal(a, 1.0)
    return a


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0..K-1 in order of their smallest class index (a stable, readable order)."""
    order = {}
    for lab in labels.tolist():
        order.setdefault(lab, len(order))
    return np.array([order[lab] for lab in labels.tolist()], dtype=np.int64)


def _knn_graph(d: np.ndarray, knn: int, t: float | None) -> tuple[np.ndarray, float]:
    """Symmetric k-nearest-neighbour graph with weights ``exp(-D/t)`` (authors' code).

    Only pairs that were confused at least once (``D < 1``) can be neighbours: a never-confused pair
    carries no evidence of similarity. ``t`` defaults to the standard deviation of the kNN distances
    (distances sit just below 1, so a ``t`` near 1 would make every weight alike); the weights are
    computed as ``exp(-(D - D_min)/t)``, the same up to a constant factor, to avoid underflow. A floor
    of 1e-4 of the largest weight keeps the graph connected.
    """
    c = d.shape[0]
    masked = np.where(d < 1.0, d, np.inf)
    np.fill_diagonal(masked, np.inf)
    nn_idx = np.argsort(masked, axis=1, kind="stable")[:, :knn]
    rows = np.repeat(np.arange(c), knn)
    cols = nn_idx.reshape(-1)
    ok = np.isfinite(masked[rows, cols])
    rows, cols = rows[ok], cols[ok]
    dk = d[rows, cols]
    if t is None:
        t = float(dk.std()) if dk.size else 1.0
    t = max(float(t), 1e-3)
    w = np.zeros_like(d)
    w[rows, cols] = np.exp(-(dk - (dk.min() if dk.size else 0.0)) / t)
    w = np.maximum(w, w.T)
    floor = 1e-4 * (w.max() if w.max() > 0 else 1.0)
    w = np.maximum(w, floor)
    np.fill_diagonal(w, 0.0)
    return w, t


def _spectral(d: np.ndarray, num_coarse: int, seed: int, affinity: str) -> np.ndarray:
    """The paper's step 3: ``SpectralClustering`` on the precomputed affinity (7), seeded."""
    c = d.shape[0]
    if num_coarse == 1:
        return np.zeros(c, dtype=np.int64)
    if num_coarse == c:
        return np.arange(c, dtype=np.int64)
    sc = SpectralClustering(
        n_clusters=num_coarse, affinity="precomputed", random_state=seed, assign_labels="kmeans", n_init=10
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not fully connected.*")
        return _canonical(np.asarray(sc.fit_predict(spectral_affinity(d, affinity))))


def _affinity_propagation(
    d: np.ndarray, num_coarse: int, seed: int, knn: int | None, t: float | None, dims: int | None, pref: float | None
) -> np.ndarray:
    """The authors' code: kNN graph (8) -> Laplacian eigenmap -> affinity propagation (K is an outcome)."""
    c = d.shape[0]
    if c < 3:
        return np.arange(c, dtype=np.int64)
    knn = min(knn or max(2, round(np.sqrt(c))), c - 1)
    w, _ = _knn_graph(d, knn, t)
    dims = max(min(dims or num_coarse - 1, c - 2), 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not fully connected.*")
        emb = SpectralEmbedding(n_components=dims, affinity="precomputed", random_state=seed).fit_transform(w)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    ap = AffinityPropagation(damping=0.9, max_iter=2000, convergence_iter=50, preference=pref, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            labels = ap.fit_predict(emb)
        except ConvergenceWarning as exc:
            raise HierarchyError(
                f"affinity propagation did not converge ({exc}); try method='spectral' or another preference"
            ) from exc
    if (labels < 0).any():
        raise HierarchyError("affinity propagation did not converge; try method='spectral'")
    return _canonical(np.asarray(labels))


def _agglomerative(d: np.ndarray, num_coarse: int) -> np.ndarray:
    """Average-linkage agglomerative clustering on the distance (6), exactly K groups."""
    if num_coarse == d.shape[0]:
        return np.arange(d.shape[0], dtype=np.int64)
    if num_coarse == 1:
        return np.zeros(d.shape[0], dtype=np.int64)
    ac = AgglomerativeClustering(n_clusters=num_coarse, metric="precomputed", linkage="average")
    return _canonical(np.asarray(ac.fit_predict(d)))


def _spectral_aside(
    d: np.ndarray, num_coarse: int, seed: int, affinity: str, isolated: np.ndarray, singles: int, pooled: bool
) -> np.ndarray | None:
    """Spectral clustering of the classes that are not near-isolated; the near-isolated ones (least
    confused first) then become ``singles`` one-class groups, or one pooled group, and the rest join the
    group they are most confused with. None when K does not fit."""
    c = d.shape[0]
    rest = np.setdiff1d(np.arange(c), isolated)
    inner = num_coarse - (1 if pooled else singles)
    if not 1 <= inner <= rest.size:
        return None
    labels = np.full(c, -1, dtype=np.int64)
    labels[rest] = _spectral(d[np.ix_(rest, rest)], inner, seed, affinity)
    confusion = np.clip(1.0 - d, 0.0, None)
    for n, j in enumerate(isolated.tolist()):
        if pooled:
            labels[j] = inner
        elif n < singles:
            labels[j] = inner + n
        else:
            labels[j] = int(np.argmax(np.bincount(labels[rest], weights=confusion[j, rest], minlength=inner)))
    return _canonical(labels)


def _candidates(
    d: np.ndarray, num_coarse: int, seed: int, affinity: str, isolated: np.ndarray, ap_args: tuple
) -> list[Candidate]:
    """``method="auto"``'s candidates: (name, labels or None, error or None), in order of preference."""
    out: list[Candidate] = [("spectral", _spectral(d, num_coarse, seed, affinity), None)]
    if isolated.size:
        for singles in range(min(isolated.size, num_coarse - 1) + 1):
            labels = _spectral_aside(d, num_coarse, seed, affinity, isolated, singles, pooled=False)
            if labels is not None:
                out.append((f"spectral-aside-{singles}", labels, None))
        if isolated.size >= 2:
            labels = _spectral_aside(d, num_coarse, seed, affinity, isolated, 0, pooled=True)
            if labels is not None:
                out.append(("spectral-pooled", labels, None))
    out.append(("agglomerative", _agglomerative(d, num_coarse), None))
    try:
        out.append(("affinity", _affinity_propagation(d, num_coarse, seed, *ap_args), None))
    except HierarchyError as exc:
        out.append(("affinity", None, str(exc)))
    return out


BASELINES = ("spectral", "agglomerative", "affinity")  # "auto" never keeps less confusion than these


def _select(
    candidates: list[Candidate], num_coarse: int, confusion: np.ndarray, a: np.ndarray, tolerance: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """Of the candidates with exactly K groups, those that keep within ``tolerance`` of the most confusion
    (11a) -- and never less than a baseline -- and among them the lowest normalised cut (11b)."""
    rows: list[dict[str, Any]] = []
    scored: list[tuple[int, float, float]] = []  # (index, kept, ncut) of the eligible candidates
    for i, (name, labels, error) in enumerate(candidates):
        if labels is None:
            rows.append({"name": name, "eligible": False, "error": error})
            continue
        q = partition_quality(confusion, a, labels)
        eligible = q["num_groups"] == num_coarse
        rows.append({"name": name, **q, "eligible": eligible, "groups": _groups(labels)})
        if eligible:
            kept = q["confusion_kept"]
            scored.append((i, kept if np.isfinite(kept) else 0.0, q["ncut"]))
    if not scored:  # no candidate found K groups: the paper's method, as it came out
        return candidates[0][1], {"chosen": candidates[0][0], "candidates": rows, "tolerance": tolerance}
    best = max(kept for _, kept, _ in scored)
    baseline = max((kept for i, kept, _ in scored if candidates[i][0] in BASELINES), default=0.0)
    floor = max(best - tolerance, baseline) - 1e-9
    chosen = min((round(ncut, 9), -kept, i) for i, kept, ncut in scored if kept >= floor)[2]
    labels = candidates[chosen][1]
    assert labels is not None
    return labels, {"chosen": candidates[chosen][0], "candidates": rows, "tolerance": tolerance}


def _groups(labels: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(labels == k).astype(int).tolist() for k in range(int(labels.max()) + 1)]


def cluster_partition(
    D: ArrayLike,
    num_coarse: int,
    *,
    method: str = "auto",
    seed: int = 0,
    affinity: str = "confusion",
    knn: int | None = None,
    t: float | None = None,
    n_components: int | None = None,
    preference: float | None = None,
    isolation: float = ISOLATION,
    tolerance: float = TOLERANCE,
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`cluster_classes` with how good the partition is: ``(labels, info)``.

    ``info["quality"]``: ``confusion_kept`` (11a), ``ncut`` (11b) on the spectral affinity (7) of kind
    ``affinity``, the group sizes. ``info["selection"]`` (``method="auto"`` only): ``chosen`` and every
    candidate's scores and groups (class indices), ``near_isolated`` (class indices, least confused
    first), ``isolation`` and ``tolerance``. ``info["warnings"]``: see :func:`quality_warnings` (also logged).
    """
    d = _check_distance(D)
    c = d.shape[0]
    if method not in CLUSTERING_METHODS:
        raise HierarchyError(f"unknown clustering method {method!r}; choose one of {', '.join(CLUSTERING_METHODS)}")
    if not 1 <= num_coarse <= c:
        raise HierarchyError(f"number of coarse categories K={num_coarse} must lie in 1..{c} (the classes)")
    a = spectral_affinity(d, affinity)
    confusion = np.clip(1.0 - d, 0.0, None)
    np.fill_diagonal(confusion, 0.0)
    ap_args = (knn, t, n_components, preference)
    info: dict[str, Any] = {}
    if method == "auto":
        isolated = near_isolated(confusion, isolation)
        labels, info["selection"] = _select(
            _candidates(d, num_coarse, seed, affinity, isolated, ap_args), num_coarse, confusion, a, tolerance
        )
        info["selection"].update(near_isolated=isolated.astype(int).tolist(), isolation=float(isolation))
    elif method == "spectral":
        labels = _spectral(d, num_coarse, seed, affinity)
    elif method == "agglomerative":
        labels = _agglomerative(d, num_coarse)
    else:
        labels = _affinity_propagation(d, num_coarse, seed, *ap_args)
    found = int(labels.max()) + 1
    if method == "spectral" and found != num_coarse:
        log.warning("spectral clustering found %d non-empty groups instead of %d", found, num_coarse)
    info["quality"] = {**partition_quality(confusion, a, labels), "ncut_affinity": affinity}
    info["warnings"] = quality_warnings(info["quality"], c, found, label=method)
    return labels, info


def cluster_classes(D: ArrayLike, num_coarse: int, **options: Any) -> np.ndarray:
    """Disjoint map ``P^d`` (fine -> coarse), an int array (C,) in 0..K-1 (METHODS.md §2.1 step 3);
    ``options`` are those of :func:`cluster_partition`.

    ``method="auto"`` (default): of the candidates below -- spectral clustering; spectral clustering of
    the classes that are not near-isolated (:func:`near_isolated`: total confusion below ``isolation``
    times the median class's) with 0..K-1 of them as one-class groups and the others joining the group
    they are most confused with (``spectral-aside-N``) or all of them in one group
    (``spectral-pooled``); agglomerative; affinity -- the one with exactly K groups that keeps the most
    confusion inside its groups (11a); candidates within ``tolerance`` (default 0.01, one point) of the
    best share count as tied, unless below a baseline's (spectral, agglomerative, affinity), and the
    tie goes to the lower normalised cut (11b). The held-out confusion is an estimate: finer differences
    in the share are noise, and among near-equal shares the lower cut is the more even partition.
    ``method="spectral"`` (paper): scikit-learn ``SpectralClustering`` on the precomputed
    :func:`spectral_affinity` of ``D``, seeded; exactly ``num_coarse`` groups.
    ``method="agglomerative"``: average-linkage ``AgglomerativeClustering`` on ``D``; exactly K groups.
    ``method="affinity"`` (authors' released code): a symmetric kNN graph (``knn`` neighbours, default
    ``max(2, round(sqrt(C)))``, among the classes it was confused with at least once; a tiny floor
    weight keeps the graph connected) with weights ``exp(-D/t)`` (``t`` default: the standard deviation
    of the kNN distances), a Laplacian eigenmap (``SpectralEmbedding``, ``n_components`` default
    ``num_coarse - 1``: K groups need K-1 non-constant eigenvectors) with rows scaled to unit length
    (as in Ng-Jordan-Weiss spectral clustering), then ``AffinityPropagation`` (``preference`` default:
    median similarity) -- the number of groups is an outcome of the data, ``num_coarse`` only sets the
    embedding size.
    Groups are numbered in order of their first class. :func:`cluster_partition` also returns the scores.
    """
    labels, _ = cluster_partition(D, num_coarse, **options)
    return labels


def partition_scores(F: ArrayLike, labels: ArrayLike, affinity: str = "confusion") -> dict[str, Any]:
    """Eqs. (11a), (11b) of a partition ``labels`` of the classes of the confusion matrix ``F``."""
    q = partition_quality(F, spectral_affinity(distance_matrix(F), affinity), labels)
    return {**q, "ncut_affinity": affinity}


def memberships(probs: ArrayLike, targets: ArrayLike, coarse_of: Sequence[int]) -> np.ndarray:
    """``u_k(j)``, a (K, C) array (METHODS.md §2.1 step 4).

    ``B^d_ik = sum_{j': P^d(j')=k} B^f_ij'``; ``u_k(j)`` = mean of ``B^d_ik`` over held-out images of
    class j. A class with no held-out image belongs only to its own coarse category (logged).
    """
    cof = np.asarray(coarse_of, dtype=np.int64)
    c = cof.shape[0]
    k = int(cof.max()) + 1 if c else 0
    t = _as_targets(targets, c)
    p = _as_probs(probs, t, c)
    onehot = np.eye(k)[cof]  # (C, K)
    bd = p @ onehot  # (N, K)
    sums = np.zeros((c, k))
    np.add.at(sums, t, bd)
    counts = np.bincount(t, minlength=c).astype(np.float64)
    u = np.empty((k, c))
    seen = counts > 0
    u[:, seen] = (sums[seen] / counts[seen, None]).T
    if (~seen).any():
        log.warning("memberships: no held-out image for class(es) %s", np.flatnonzero(~seen).tolist())
        u[:, ~seen] = onehot[~seen].T
    return u


def _partial_from_u(u: np.ndarray, coarse_of: np.ndarray, u_t: float, max_size: int | None) -> list[list[int]]:
    k = u.shape[0]
    if max_size is not None and max_size < 1:
        raise HierarchyError(f"max partial-set size must be >= 1, got {max_size}")
    sets: list[list[int]] = []
    for kk in range(k):
        own = coarse_of == kk
        if not own.any():
            raise HierarchyError(f"coarse category {kk} has no class: empty partial set")
        member = own | (u[kk] >= u_t)
        idx = np.flatnonzero(member)
        if max_size is not None and idx.size > max_size:
            n_own = int(own.sum())
            if n_own > max_size:
                log.warning("coarse category %d: %d own classes exceed the cap %d; all kept", kk, n_own, max_size)
            extra = np.flatnonzero(member & ~own)
            keep = max(max_size - n_own, 0)
            order = extra[np.argsort(-u[kk, extra], kind="stable")][:keep]
            idx = np.sort(np.concatenate([np.flatnonzero(own), order]))
        sets.append(idx.astype(int).tolist())
    return sets


def partial_sets(
    probs: ArrayLike,
    targets: ArrayLike,
    coarse_of: Sequence[int],
    *,
    gamma: float = 5.0,
    max_size: int | None = None,
) -> list[list[int]]:
    """Overlapping partial sets ``S_k`` (METHODS.md §2.1 step 4), each a sorted list of fine-class indices.

    Class j joins ``S_k`` if ``u_k(j) >= u_t = 1/(gamma K)``; a class always belongs to its own
    disjoint category, so ``gamma = 1/K`` (``u_t = 1``) gives the disjoint sets and ``gamma -> inf``
    the full sets. ``max_size`` caps ``|S_k|`` keeping the classes with the highest ``u_k(j)``
    (the disjoint members are always kept).
    """
    if not gamma > 0:
        raise HierarchyError(f"gamma must be > 0, got {gamma}")
    cof = np.asarray(coarse_of, dtype=np.int64)
    u = memberships(probs, targets, cof)
    return _partial_from_u(u, cof, 1.0 / (gamma * u.shape[0]), max_size)


COARSE_TARGET_RULES = ("paper", "aggregation")


def coarse_targets(partial_sets: Sequence[Sequence[int]], class_counts: ArrayLike, rule: str = "paper") -> np.ndarray:
    """The consistency term's targets t_k (METHODS.md §2.3), a (K,) array summing to 1.

    ``paper``: ``t_k = sum_{j in S_k} n_j / sum_k' sum_{j in S_k'} n_j``.
    ``aggregation``: ``t_k = 1/N sum_{j in S_k} n_j / m_j`` with m_j the number of partial sets
    holding class j: the mean B_ik of a coarse component that is always right, under the
    L1-normalised aggregation of METHODS.md §2.2. The two agree when the partial sets are disjoint; with
    overlaps the paper's rule asks classes in few partial sets (e.g. a singleton) for less coarse
    probability than they need.
    """
    if rule not in COARSE_TARGET_RULES:
        raise HierarchyError(f"coarse target rule {rule!r} is not one of {COARSE_TARGET_RULES}")
    counts = np.asarray(class_counts, dtype=np.float64)
    if not partial_sets:
        raise HierarchyError("no partial sets given")
    member = np.zeros((counts.shape[0], len(partial_sets)))
    for k, s in enumerate(partial_sets):
        if len(s) == 0:
            raise HierarchyError(f"partial set {k} is empty")
        idx = np.asarray(s, dtype=np.int64)
        if idx.min() < 0 or idx.max() >= counts.shape[0]:
            raise HierarchyError(f"partial set {k} names a class outside 0..{counts.shape[0] - 1}")
        member[idx, k] = 1.0
    if rule == "aggregation":
        share = member.sum(axis=1, keepdims=True)
        member = np.divide(member, share, out=np.zeros_like(member), where=share > 0)
    mass = counts @ member
    total = mass.sum()
    if total <= 0:
        raise HierarchyError("class counts of the partial sets sum to zero")
    return mass / total


def _named_selection(selection: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``method="auto"``'s record with class names in place of indices (stable under ``Hierarchy.reorder``)."""
    rows = []
    for row in selection["candidates"]:
        row = dict(row)
        if "groups" in row:
            row["groups"] = [[names[j] for j in g] for g in row["groups"]]
        rows.append(row)
    near = [names[j] for j in selection["near_isolated"]]
    return {**selection, "candidates": rows, "near_isolated": near}


_AFFINITY_OF = {"affinity": "knn-exp", "agglomerative": "distance (average linkage)"}


def learn_hierarchy(
    probs: ArrayLike,
    targets: ArrayLike,
    class_names: Sequence[str],
    num_coarse: int,
    *,
    method: str = "auto",
    gamma: float = 5.0,
    max_partial_size: int | None = None,
    seed: int = 0,
    affinity: str = "confusion",
) -> Hierarchy:
    """METHODS.md §2.1 steps 2-4 end to end, from the building block's held-out softmax ``probs`` (N, C).

    ``meta["quality"]`` holds eqs. (11a), (11b) of the partition; with ``method="auto"``,
    ``meta["selection"]`` names the winning candidate and every candidate's scores and groups.
    """
    names = [str(n) for n in class_names]
    c = len(names)
    t = _as_targets(targets, c)
    p = _as_probs(probs, t, c)
    if not gamma > 0:
        raise HierarchyError(f"gamma must be > 0, got {gamma}")
    F = confusion_matrix(p, t, c)
    D = distance_matrix(F)
    coarse_of, info = cluster_partition(D, num_coarse, method=method, seed=seed, affinity=affinity)
    u = memberships(p, t, coarse_of)
    k = u.shape[0]
    u_t = 1.0 / (gamma * k)
    sets = _partial_from_u(u, coarse_of, u_t, max_partial_size)
    meta = {
        "method": method,
        "affinity": _AFFINITY_OF.get(method, affinity),
        "requested_num_coarse": int(num_coarse),
        "gamma": float(gamma),
        "u_t": float(u_t),
        "max_partial_size": max_partial_size,
        "seed": int(seed),
        "num_heldout": int(t.shape[0]),
        "heldout_accuracy": float((p.argmax(axis=1) == t).mean()) if t.size else None,
        "u": np.round(u, 6).tolist(),
        "quality": info["quality"],
        "warnings": info["warnings"],
    }
    if "selection" in info:
        meta["selection"] = _named_selection(info["selection"], names)
    return Hierarchy(
        class_names=names,
        coarse_of=coarse_of.astype(int).tolist(),
        partial_sets=sets,
        coarse_names=default_coarse_names(names, coarse_of.tolist()),
        meta=meta,
    )

"""HD-CNN's learned category hierarchy (METHODS.md §2.1): clustering, partial sets, JSON, plots, comparison."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from coarse2fine.errors import C2FError, HierarchyError
from coarse2fine.hierarchy import (
    CLUSTERING_METHODS,
    Hierarchy,
    cluster_classes,
    cluster_partition,
    coarse_targets,
    compare_to_reference,
    confusion_kept,
    confusion_matrix,
    distance_matrix,
    learn_hierarchy,
    load_reference,
    memberships,
    mistake_severity,
    near_isolated,
    normalised_cut,
    partial_sets,
    partition_quality,
    partition_scores,
    plot_hierarchy,
    quality_warnings,
)
from coarse2fine.hierarchy.plot import quality_line
from helpers.benchmarks import load_benchmark


def planted(num_classes: int, num_coarse: int, seed: int, n_per: int = 40):
    """Held-out softmax of a block whose mistakes stay inside planted groups (random group order)."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.arange(num_classes) % num_coarse)
    targets = np.repeat(np.arange(num_classes), n_per)
    probs = np.full((targets.size, num_classes), 0.002)
    probs += 0.2 * (groups[targets][:, None] == groups[None, :])
    probs[np.arange(targets.size), targets] += 0.15
    probs *= rng.uniform(0.3, 1.7, probs.shape)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs, targets, groups


def names_of(c: int) -> list[str]:
    return [f"class{i}" for i in range(c)]


def reference_of(groups: np.ndarray) -> dict[str, list[str]]:
    names = names_of(groups.size)
    return {f"g{g}": [names[i] for i in np.flatnonzero(groups == g)] for g in np.unique(groups)}


# ---- confusion and distance -------------------------------------------------------------------


def test_confusion_matrix_by_hand_labels_and_scores() -> None:
    targets = [0, 0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 2, 1, 0, 2]
    F = confusion_matrix(preds, targets, 3)
    np.testing.assert_allclose(F, [[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    scores = np.eye(3)[preds] * 0.7 + 0.1  # arg-max = preds
    np.testing.assert_allclose(confusion_matrix(scores, targets, 3), F)
    soft = confusion_matrix(scores, targets, 3, soft=True)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    np.testing.assert_allclose(soft[2], [0.1, 0.1, 0.8])


def test_confusion_matrix_rejects_bad_shapes_and_labels() -> None:
    with pytest.raises(HierarchyError, match="targets"):
        confusion_matrix([0, 1], [0, 1], 1)  # label 1 outside 0..0
    with pytest.raises(HierarchyError, match="shape"):
        confusion_matrix(np.ones((2, 4)), [0, 1], 3)
    with pytest.raises(HierarchyError, match="predictions"):
        confusion_matrix([0, 1, 1], [0, 1], 2)


def test_distance_matrix_properties() -> None:
    rng = np.random.default_rng(0)
    F = rng.dirichlet(np.ones(6), size=6)
    D = distance_matrix(F)
    np.testing.assert_allclose(D, D.T)
    np.testing.assert_array_equal(np.diag(D), 0.0)
    assert D.min() >= 0.0 and D.max() <= 1.0
    i, j = 1, 4
    assert D[i, j] == pytest.approx(1.0 - 0.5 * (F[i, j] + F[j, i]))
    # never confused -> distance 1; more confusion -> closer
    F2 = np.eye(3)
    F2[0] = [0.6, 0.4, 0.0]
    D2 = distance_matrix(F2)
    assert D2[1, 2] == 1.0 and D2[0, 1] == pytest.approx(0.8)
    with pytest.raises(HierarchyError, match="square"):
        distance_matrix(np.ones((2, 3)))


# ---- clustering -------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_classes", "num_coarse", "seed"), [(12, 3, 0), (30, 5, 1), (40, 4, 2)])
def test_spectral_recovers_planted_blocks_exactly(num_classes: int, num_coarse: int, seed: int) -> None:
    probs, targets, groups = planted(num_classes, num_coarse, seed)
    h = learn_hierarchy(probs, targets, names_of(num_classes), num_coarse, method="spectral", seed=seed)
    scores = compare_to_reference(h, reference_of(groups))
    assert scores["ari"] == 1.0
    assert scores["nmi"] == pytest.approx(1.0)
    assert h.num_coarse == num_coarse and h.num_classes == num_classes


def test_gaussian_affinity_also_recovers_blocks() -> None:
    probs, targets, groups = planted(12, 3, 0)
    D = distance_matrix(confusion_matrix(probs, targets, 12))
    labels = cluster_classes(D, 3, affinity="gaussian")
    assert adjusted_rand_score(groups, labels) == 1.0


@pytest.mark.parametrize(("num_classes", "num_coarse", "seed"), [(12, 3, 0), (30, 5, 1)])
def test_affinity_propagation_variant_recovers_blocks(num_classes: int, num_coarse: int, seed: int) -> None:
    probs, targets, groups = planted(num_classes, num_coarse, seed)
    h = learn_hierarchy(probs, targets, names_of(num_classes), num_coarse, method="affinity", seed=seed)
    assert h.meta["method"] == "affinity"
    assert h.num_coarse == num_coarse  # an outcome of the data here, not an input
    assert compare_to_reference(h, reference_of(groups))["ari"] == 1.0


def test_clustering_is_seeded_and_canonically_numbered() -> None:
    probs, targets, _ = planted(20, 4, 3)
    D = distance_matrix(confusion_matrix(probs, targets, 20))
    a = cluster_classes(D, 4, seed=7)
    b = cluster_classes(D, 4, seed=7)
    np.testing.assert_array_equal(a, b)
    firsts = [int(np.flatnonzero(a == k)[0]) for k in range(4)]
    assert firsts == sorted(firsts) and a[0] == 0


def test_cluster_classes_bad_k_and_method() -> None:
    D = distance_matrix(np.eye(5))
    with pytest.raises(HierarchyError, match="K=6"):
        cluster_classes(D, 6)
    with pytest.raises(HierarchyError, match="K=0"):
        cluster_classes(D, 0)
    with pytest.raises(HierarchyError, match="unknown clustering method"):
        cluster_classes(D, 2, method="kmeans")
    with pytest.raises(HierarchyError, match="unknown affinity"):
        cluster_classes(D, 2, affinity="cosine")
    np.testing.assert_array_equal(cluster_classes(D, 5), np.arange(5))
    np.testing.assert_array_equal(cluster_classes(D, 1), np.zeros(5))
    with pytest.raises(HierarchyError):  # too many coarse categories for learn_hierarchy too
        learn_hierarchy(np.full((5, 5), 0.2), np.arange(5), names_of(5), 9)


# ---- hierarchy quality (METHODS.md eqs. (11a), (11b)) and the default method "auto" ----------------

PLANTED = load_benchmark("hierarchy_quality")  # the planted Fashion-MNIST-like confusion of its table
FMNIST = PLANTED.CLASSES


def confusion_of_pairs(num_classes: int, pairs: dict[tuple[int, int], float], background: float) -> np.ndarray:
    """A row-normalised confusion matrix with F_ij = F_ji = the pair's value (``background`` elsewhere)."""
    F = np.full((num_classes, num_classes), background)
    for (i, j), v in pairs.items():
        F[i, j] = F[j, i] = v
    np.fill_diagonal(F, 0.0)
    np.fill_diagonal(F, 1.0 - F.sum(axis=1))
    return F


def fmnist_like() -> np.ndarray:
    return PLANTED.planted_confusion(background=0.001)


def isolated_planted(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """11 classes in shuffled order: a confusable block of 5, two pairs and two near-isolated classes
    (only the 0.001 background confusion); the planted 5 groups."""
    rng = np.random.default_rng(seed)
    pairs = {(i, j): float(rng.uniform(0.02, 0.08)) for i in range(5) for j in range(i + 1, 5)}
    pairs.update({(5, 6): 0.10, (7, 8): 0.08})
    F = confusion_of_pairs(11, pairs, 0.001)
    truth = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4])
    perm = rng.permutation(11)
    return F[np.ix_(perm, perm)], truth[perm]


def probs_of_confusion(F: np.ndarray, n_per: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Held-out softmax whose arg-max confusion matrix is ``F`` (rounded to 1/n_per)."""
    c = F.shape[0]
    targets, preds = [], []
    for i in range(c):
        counts = np.round(F[i] * n_per).astype(int)
        counts[i] += n_per - counts.sum()
        targets += [i] * n_per
        preds += np.repeat(np.arange(c), counts).tolist()
    probs = np.full((len(preds), c), 0.5 / c) + 0.5 * np.eye(c)[preds]
    return probs, np.asarray(targets)


def test_quality_by_hand() -> None:
    F = np.array([[0.8, 0.1, 0.1, 0.0], [0.2, 0.7, 0.0, 0.1], [0.0, 0.0, 1.0, 0.0], [0.0, 0.3, 0.0, 0.7]])
    # symmetrised: S01 = 0.15, S02 = 0.05, S13 = 0.2, others 0; sum over i != j = 2 * 0.4 = 0.8
    assert confusion_kept(F, [0, 0, 1, 1]) == pytest.approx(2 * 0.15 / 0.8)  # pairs 01 and 23 kept
    assert confusion_kept(F, [0, 0, 1, 0]) == pytest.approx(2 * 0.35 / 0.8)  # 01, 03, 13 kept
    assert confusion_kept(F, [0, 1, 2, 3]) == 0.0 and confusion_kept(F, [0, 0, 0, 0]) == 1.0
    assert np.isnan(confusion_kept(np.eye(3), [0, 1, 2]))
    S = 0.5 * (F + F.T)  # the affinity's diagonal is ignored; degrees 0.2, 0.35, 0.05, 0.2
    # {0,1,3}: cut 0.05 / vol 0.75; {2}: cut 0.05 / vol 0.05
    assert normalised_cut(S, [0, 0, 1, 0]) == pytest.approx(0.05 / 0.75 + 1.0)
    # {0,1}: cut 0.25 / vol 0.55; {2,3}: cut 0.25 / vol 0.25
    assert normalised_cut(S, [0, 0, 1, 1]) == pytest.approx(0.25 / 0.55 + 1.0)
    assert normalised_cut(S, [0, 0, 0, 0]) == 0.0
    q = partition_quality(F, S, [0, 0, 1, 0])
    assert q["num_groups"] == 2 and q["group_sizes"] == [3, 1]
    # on the clustering affinity (7), whose 1e-6 floor barely moves the cut
    scores = partition_scores(F, [0, 0, 1, 0])
    assert scores["ncut"] == pytest.approx(0.05 / 0.75 + 1.0, rel=1e-3) and scores["ncut_affinity"] == "confusion"
    with pytest.raises(HierarchyError, match="labels"):
        confusion_kept(F, [0, 1])


def test_near_isolated_classes() -> None:
    iso = near_isolated(fmnist_like())
    assert [FMNIST[j] for j in iso] == ["Trouser", "Bag"]  # least confused first
    assert near_isolated(np.full((4, 4), 0.25)).size == 0


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_auto_recovers_planted_groups_with_near_isolated_classes(seed: int) -> None:
    F, truth = isolated_planted(seed)
    D = distance_matrix(F)
    labels, info = cluster_partition(D, 5, seed=seed)
    assert adjusted_rand_score(truth, labels) == 1.0
    kept = info["quality"]["confusion_kept"]
    assert kept == pytest.approx(confusion_kept(F, labels))
    for baseline in ("spectral", "agglomerative", "affinity"):
        other = cluster_classes(D, 5, method=baseline, seed=seed)
        assert kept >= confusion_kept(F, other) - 1e-12, baseline
    sel = info["selection"]
    assert sorted(sel["near_isolated"]) == sorted(np.flatnonzero(truth >= 3).tolist())
    names = [row["name"] for row in sel["candidates"]]
    assert sel["chosen"] in names and names[0] == "spectral" and "agglomerative" in names
    assert {"spectral-aside-0", "spectral-aside-2", "spectral-pooled"} <= set(names)


def test_auto_on_a_fashion_mnist_like_matrix() -> None:
    F = fmnist_like()
    D = distance_matrix(F)
    tops = frozenset({"T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"})
    obvious = {tops, frozenset({"Trouser"}), frozenset({"Sandal", "Sneaker", "Ankle boot"}), frozenset({"Bag"})}
    for k in (3, 4, 5):
        labels, info = cluster_partition(D, k)
        if k == 4:
            assert {frozenset(FMNIST[j] for j in np.flatnonzero(labels == g)) for g in range(4)} == obvious
        rows = {row["name"]: row for row in info["selection"]["candidates"]}
        for baseline in ("spectral", "agglomerative", "affinity"):  # the same runs as method=baseline
            assert info["quality"]["confusion_kept"] >= rows[baseline]["confusion_kept"] - 1e-12


def test_explicit_methods_and_their_names() -> None:
    assert CLUSTERING_METHODS[0] == "auto" and {"spectral", "affinity", "agglomerative"} <= set(CLUSTERING_METHODS)
    F, _ = isolated_planted(0)
    labels, info = cluster_partition(distance_matrix(F), 5, method="agglomerative")
    assert "selection" not in info and info["quality"]["num_groups"] == 5
    assert info["quality"]["confusion_kept"] == pytest.approx(confusion_kept(F, labels))


def test_quality_warnings(caplog) -> None:
    uniform = np.full((8, 8), 1 / 8)
    with caplog.at_level(logging.WARNING, logger="coarse2fine.hierarchy"):
        labels, info = cluster_partition(distance_matrix(uniform), 2, method="spectral")
    assert confusion_kept(uniform, labels) < 0.5
    assert any("keeps only" in r.getMessage() for r in caplog.records)
    assert not any("at least half" in r.getMessage() for r in caplog.records)
    assert info["warnings"] and "keeps only" in info["warnings"][0]
    caplog.clear()
    F, _ = isolated_planted(0)
    with caplog.at_level(logging.WARNING, logger="coarse2fine.hierarchy"):
        cluster_partition(distance_matrix(F), 6)  # 6 of 11 classes
    assert [r.getMessage() for r in caplog.records if "at least half" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coarse2fine.hierarchy"):
        _, info = cluster_partition(distance_matrix(F), 5)  # 5 of 11, most confusion kept: quiet
    assert not caplog.records and info["warnings"] == []
    no_confusion = quality_warnings({"confusion_kept": float("nan")}, 5, 2)
    assert no_confusion == ["no off-diagonal confusion: the grouping is arbitrary"]


def test_auto_meta_json_round_trip(tmp_path) -> None:
    F, truth = isolated_planted(1)
    probs, targets = probs_of_confusion(F)
    names = names_of(11)
    h = learn_hierarchy(probs, targets, names, 5, seed=1)
    assert h.meta["method"] == "auto" and h.meta["affinity"] == "confusion"
    assert adjusted_rand_score(truth, h.coarse_of) == 1.0
    q, sel = h.meta["quality"], h.meta["selection"]
    assert q["confusion_kept"] == pytest.approx(confusion_kept(confusion_matrix(probs, targets, 11), h.coarse_of))
    assert sorted(sel["near_isolated"]) == sorted(names[j] for j in np.flatnonzero(truth >= 3))
    chosen = next(row for row in sel["candidates"] if row["name"] == sel["chosen"])
    assert sorted(map(sorted, chosen["groups"])) == sorted(map(sorted, h.groups()))
    assert chosen["confusion_kept"] == q["confusion_kept"] and sel["tolerance"] == 0.01
    back = Hierarchy.load(h.save(tmp_path / "h.json"), class_names=names)
    assert back.meta["quality"] == q and back.meta["selection"] == sel and back == h
    assert Hierarchy.load(tmp_path / "h.json", class_names=names[::-1]).meta["selection"] == sel
    assert "confusion kept inside groups" in quality_line(back) and sel["chosen"] in quality_line(back)


# ---- memberships and partial sets ------------------------------------------------------------


def _tiny_probs():
    """4 classes, disjoint groups {0,1} and {2,3}; two held-out images per class."""
    coarse_of = [0, 0, 1, 1]
    probs = np.array(
        [
            [0.7, 0.2, 0.1, 0.0],  # class 0: B^d = (0.9, 0.1)
            [0.5, 0.2, 0.2, 0.1],  # class 0: (0.7, 0.3)      -> u(0) = (0.8, 0.2)
            [0.1, 0.5, 0.4, 0.0],  # class 1: (0.6, 0.4)
            [0.2, 0.6, 0.0, 0.2],  # class 1: (0.8, 0.2)      -> u(1) = (0.7, 0.3)
            [0.0, 0.0, 1.0, 0.0],  # class 2: (0, 1)
            [0.0, 0.1, 0.8, 0.1],  # class 2: (0.1, 0.9)      -> u(2) = (0.05, 0.95)
            [0.0, 0.0, 0.1, 0.9],  # class 3: (0, 1)
            [0.0, 0.0, 0.5, 0.5],  # class 3: (0, 1)          -> u(3) = (0, 1)
        ]
    )
    targets = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    return probs, targets, coarse_of


def test_memberships_by_hand() -> None:
    probs, targets, coarse_of = _tiny_probs()
    u = memberships(probs, targets, coarse_of)
    np.testing.assert_allclose(u, [[0.8, 0.7, 0.05, 0.0], [0.2, 0.3, 0.95, 1.0]])
    np.testing.assert_allclose(u.sum(axis=0), 1.0)


def test_partial_set_threshold() -> None:
    probs, targets, coarse_of = _tiny_probs()
    # K=2: u_t = 1/(2 gamma). gamma=2 -> u_t=0.25: class 1 (0.3) joins S_1, class 0 (0.2) does not.
    assert partial_sets(probs, targets, coarse_of, gamma=2.0) == [[0, 1], [1, 2, 3]]
    # gamma=2.4 -> u_t=0.2083: class 0 (0.2) still out; gamma=2.5 -> u_t=0.2: class 0 in (>=).
    assert partial_sets(probs, targets, coarse_of, gamma=2.4) == [[0, 1], [1, 2, 3]]
    assert partial_sets(probs, targets, coarse_of, gamma=2.5) == [[0, 1], [0, 1, 2, 3]]
    # gamma=10 -> u_t=0.05: class 2 (0.05) joins S_0; class 3 (0.0) never does.
    assert partial_sets(probs, targets, coarse_of, gamma=10.0) == [[0, 1, 2], [0, 1, 2, 3]]


def test_partial_set_limits() -> None:
    probs, targets, _ = planted(12, 3, 0)
    coarse_of = cluster_classes(distance_matrix(confusion_matrix(probs, targets, 12)), 3)
    disjoint = [np.flatnonzero(coarse_of == k).tolist() for k in range(3)]
    # u_t = 1: gamma = 1/K gives the disjoint sets
    assert partial_sets(probs, targets, coarse_of, gamma=1 / 3) == disjoint
    # u_t -> 0 gives the full sets (every membership is positive here)
    full = partial_sets(probs, targets, coarse_of, gamma=1e9)
    assert full == [list(range(12))] * 3
    # in between: supersets of the disjoint groups
    mid = partial_sets(probs, targets, coarse_of, gamma=5.0)
    assert all(set(d) <= set(s) for d, s in zip(disjoint, mid))
    with pytest.raises(HierarchyError, match="gamma"):
        partial_sets(probs, targets, coarse_of, gamma=0.0)


def test_partial_set_cap_keeps_highest_u_and_own_classes() -> None:
    probs, targets, coarse_of = _tiny_probs()
    full = partial_sets(probs, targets, coarse_of, gamma=10.0)
    assert full == [[0, 1, 2], [0, 1, 2, 3]]
    # cap 3: S_1 = own {2, 3} + the highest-u outsider (class 1: 0.3 > class 0: 0.2)
    assert partial_sets(probs, targets, coarse_of, gamma=10.0, max_size=3) == [[0, 1, 2], [1, 2, 3]]
    # cap 1: below the disjoint group size, own classes are all kept
    assert partial_sets(probs, targets, coarse_of, gamma=10.0, max_size=1) == [[0, 1], [2, 3]]
    with pytest.raises(HierarchyError, match="max partial-set size"):
        partial_sets(probs, targets, coarse_of, max_size=0)


def test_empty_coarse_category_is_an_error() -> None:
    probs, targets, _ = _tiny_probs()
    with pytest.raises(HierarchyError, match="empty partial set"):
        partial_sets(probs, targets, [0, 0, 2, 2], gamma=5.0)  # coarse category 1 has no class


def test_coarse_targets_by_hand() -> None:
    t = coarse_targets([[0, 1], [1, 2]], [10, 20, 30])
    # masses: S_0 = 10 + 20 = 30, S_1 = 20 + 30 = 50 -> 30/80, 50/80
    np.testing.assert_allclose(t, [0.375, 0.625])
    with pytest.raises(HierarchyError, match="empty"):
        coarse_targets([[0], []], [1, 2])
    with pytest.raises(HierarchyError, match="outside"):
        coarse_targets([[0, 5]], [1, 2])


def test_coarse_targets_aggregation_rule() -> None:
    # class 1 is in both partial sets, so it counts half in each: (10 + 20/2) / 60, (20/2 + 30) / 60
    t = coarse_targets([[0, 1], [1, 2]], [10, 20, 30], rule="aggregation")
    np.testing.assert_allclose(t, [20 / 60, 40 / 60])
    disjoint = [[0, 2], [1], [3]]
    np.testing.assert_allclose(
        coarse_targets(disjoint, [5, 7, 9, 11], rule="aggregation"), coarse_targets(disjoint, [5, 7, 9, 11])
    )
    with pytest.raises(HierarchyError, match="'exact'"):
        coarse_targets(disjoint, [5, 7, 9, 11], rule="exact")


# ---- the Hierarchy object --------------------------------------------------------------------


def _learnt() -> Hierarchy:
    probs, targets, _ = planted(12, 3, 0)
    return learn_hierarchy(probs, targets, names_of(12), 3, gamma=5.0, max_partial_size=8)


def test_learn_hierarchy_records_how() -> None:
    h = _learnt()
    assert h.meta["method"] == "auto" and h.meta["gamma"] == 5.0
    assert h.meta["quality"]["confusion_kept"] > 0.9 and h.meta["quality"]["ncut_affinity"] == "confusion"
    assert h.meta["u_t"] == pytest.approx(1 / 15)
    assert np.asarray(h.meta["u"]).shape == (3, 12)
    assert all(len(s) <= 8 for s in h.partial_sets)
    groups = h.groups()
    assert sorted(n for g in groups for n in g) == sorted(names_of(12))
    assert h.coarse_names[0].startswith(groups[0][0] + "/" + groups[0][1])
    assert [len(g) for g in h.partial_groups()] == [len(s) for s in h.partial_sets]


def test_json_round_trip_is_atomic(tmp_path) -> None:
    h = _learnt()
    path = h.save(tmp_path / "sub" / "hierarchy.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["hierarchy.json"]  # no temp file left
    back = Hierarchy.load(path, class_names=names_of(12))
    assert back == h
    assert Hierarchy.from_dict(json.loads(path.read_text())) == h
    assert back.to_dict() == h.to_dict()


def test_load_reorders_classes_to_the_data(tmp_path) -> None:
    h = _learnt()
    path = h.save(tmp_path / "h.json")
    order = names_of(12)[::-1]
    back = Hierarchy.load(path, class_names=order)
    assert back.class_names == order
    assert back.groups() == h.groups() or sorted(map(sorted, back.groups())) == sorted(map(sorted, h.groups()))
    for k in range(h.num_coarse):
        assert {back.class_names[j] for j in back.partial_sets[k]} == {h.class_names[j] for j in h.partial_sets[k]}
    np.testing.assert_allclose(np.asarray(back.meta["u"])[:, ::-1], np.asarray(h.meta["u"]))
    with pytest.raises(HierarchyError, match="another order"):
        h.validate(order)


def test_load_names_file_and_differing_classes(tmp_path) -> None:
    path = _learnt().save(tmp_path / "h.json")
    data = [*names_of(11), "zebra"]
    with pytest.raises(HierarchyError) as err:
        Hierarchy.load(path, class_names=data)
    msg = str(err.value)
    assert str(path) in msg and "zebra" in msg and "class11" in msg
    assert isinstance(err.value, C2FError)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"class_names": ["a", "b"]}', "missing key"),
        ('{"class_names": ["a", "b"], "coarse_of": [0, 1], "partial_sets": [[0], []]}', "is empty"),
        ('{"class_names": ["a", "b"], "coarse_of": [0, 3], "partial_sets": [[0], [1]]}', "coarse index 3"),
        ('{"class_names": ["a", "b"], "coarse_of": [0, 1], "partial_sets": [[0], [0]]}', "lacks its own"),
        ('{"class_names": ["a", "a"], "coarse_of": [0, 1], "partial_sets": [[0], [1]]}', "duplicate"),
        ('{"class_names": ["a", "b"], "coarse_of": [0, 1], "partial_sets": [[0, 7], [1]]}', "outside"),
        ('{"class_names": ["a"], "coarse_of": [0], "partial_sets": [[0]], "version": 9}', "version"),
    ],
)
def test_malformed_files_are_rejected(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(HierarchyError, match=match) as err:
        Hierarchy.load(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(HierarchyError, match="does not exist"):
        Hierarchy.load(tmp_path / "nope.json")


def test_plot_writes_png(tmp_path) -> None:
    probs, targets, _ = planted(12, 3, 0)
    h = learn_hierarchy(probs, targets, names_of(12), 3)
    F = confusion_matrix(probs, targets, 12)
    out = plot_hierarchy(h, F, tmp_path / "plots" / "hierarchy.png")
    head = out.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert [p.name for p in out.parent.iterdir()] == ["hierarchy.png"]
    with pytest.raises(HierarchyError, match="shape"):
        plot_hierarchy(h, F[:5, :5], tmp_path / "x.png")


# ---- comparison with a reference --------------------------------------------------------------


def test_compare_to_reference(tmp_path) -> None:
    names = names_of(6)
    h = Hierarchy(names, [0, 0, 1, 1, 2, 2], [[0, 1], [2, 3], [4, 5]], ["a", "b", "c"])
    same = {"x": ["class4", "class5"], "y": ["class0", "class1"], "z": ["class2", "class3"]}
    s = compare_to_reference(h, same)
    assert s["ari"] == 1.0 and s["nmi"] == pytest.approx(1.0) and s["purity"] == 1.0
    other = {"x": ["class0", "class2", "class4"], "y": ["class1", "class3", "class5"], "extra": ["cat"]}
    s2 = compare_to_reference(h, other)
    assert s2["ari"] < 0.5 and s2["nmi"] < 0.5
    assert s2["unknown_in_reference"] == ["cat"] and s2["classes_compared"] == 6
    partial = {"x": ["class0", "class1"]}
    assert compare_to_reference(h, partial)["missing_from_reference"] == names[2:]
    with pytest.raises(HierarchyError, match="no class name"):
        compare_to_reference(h, {"x": ["dog"]})
    with pytest.raises(HierarchyError, match="two groups"):
        compare_to_reference(h, {"x": ["class0"], "y": ["class0"]})
    # reference files: plain {coarse: [fine]} or a saved hierarchy
    (tmp_path / "ref.json").write_text(json.dumps(same))
    assert load_reference(tmp_path / "ref.json") == same
    h.save(tmp_path / "h.json")
    assert compare_to_reference(h, load_reference(tmp_path / "h.json"))["ari"] == 1.0
    (tmp_path / "bad.json").write_text('{"x": "class0"}')
    with pytest.raises(HierarchyError, match=r"bad\.json"):
        load_reference(tmp_path / "bad.json")


def test_mistake_severity_by_hand() -> None:
    names = names_of(4)
    reference = {"a": ["class0", "class1"], "b": ["class2", "class3"]}
    target = [0, 0, 1, 2, 3, 3]
    pred = [0, 1, 2, 2, 2, 0]  # errors: 0->1 (within), 1->2 (cross), 3->2 (within), 3->0 (cross)
    s = mistake_severity(pred, target, reference, class_names=names)
    assert s["errors"] == 4 and s["cross_group_errors"] == 2
    assert s["cross_fraction"] == 0.5 and s["error_rate"] == pytest.approx(4 / 6)
    assert s["coarse_accuracy"] == pytest.approx(4 / 6)
    assert mistake_severity(pred, target, [0, 0, 1, 1]) == s
    h = Hierarchy(names, [0, 0, 1, 1], [[0, 1], [2, 3]], ["a", "b"])
    assert mistake_severity(pred, target, h) == s
    with pytest.raises(HierarchyError, match="class_names"):
        mistake_severity(pred, target, reference)


def test_hierarchy_from_reference_taxonomy() -> None:
    names = names_of(5)
    ref = {"b": ["class3", "class1"], "empty": ["dog"], "a": ["class0", "class2", "class4"]}
    h = Hierarchy.from_reference(ref, names)
    assert h.coarse_names == ["b", "a"] and h.coarse_of == [1, 0, 1, 0, 1]
    assert h.partial_sets == [[1, 3], [0, 2, 4]] and h.meta["method"] == "reference"
    assert compare_to_reference(h, ref)["ari"] == 1.0
    with pytest.raises(HierarchyError, match="missing from the taxonomy"):
        Hierarchy.from_reference({"a": ["class0"]}, names)
    with pytest.raises(HierarchyError, match="two coarse categories"):
        Hierarchy.from_reference({"a": names, "b": ["class0"]}, names)

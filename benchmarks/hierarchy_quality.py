"""Hierarchy quality of each clustering method on a planted Fashion-MNIST-like confusion matrix.

For K = 3, 4, 5: the groups, the share of the off-diagonal confusion kept inside groups (METHODS.md
eq. (11a)) and the normalised cut on the clustering affinity (eq. (11b)) of spectral clustering (paper),
average-linkage agglomerative clustering, the authors' kNN + eigenmap + affinity propagation, and the
default ``auto``; plus the "obvious" grouping for reference. Prints a markdown table.

    python benchmarks/hierarchy_quality.py [--seeds 5] [--background 0.001]

The matrix is planted, not measured: symmetrised confusion T-shirt/Shirt 0.10, Pullover/Coat 0.08,
Pullover/Shirt 0.07, Coat/Shirt 0.06, T-shirt/Pullover 0.02, Dress/Coat 0.03, T-shirt/Dress 0.03,
Sandal/Sneaker 0.03, Sneaker/Ankle boot 0.03, Sandal/Ankle boot 0.01; Trouser and Bag almost never
confused (Trouser/Dress 0.005, Bag/T-shirt 0.005, Bag/Shirt 0.0025); every other pair ``--background``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from coarse2fine.hierarchy import cluster_partition, distance_matrix, partition_scores

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PAIRS = {
    ("T-shirt/top", "Shirt"): 0.10,
    ("Pullover", "Coat"): 0.08,
    ("Pullover", "Shirt"): 0.07,
    ("Coat", "Shirt"): 0.06,
    ("T-shirt/top", "Pullover"): 0.02,
    ("Dress", "Coat"): 0.03,
    ("T-shirt/top", "Dress"): 0.03,
    ("Sandal", "Sneaker"): 0.03,
    ("Sneaker", "Ankle boot"): 0.03,
    ("Sandal", "Ankle boot"): 0.01,
    ("Trouser", "Dress"): 0.005,
    ("Bag", "T-shirt/top"): 0.005,
    ("Bag", "Shirt"): 0.0025,
}
SHORT = {"T-shirt/top": "T-shirt", "Ankle boot": "Boot"}
TOPS = ["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"]
FOOTWEAR = ["Sandal", "Sneaker", "Ankle boot"]
OBVIOUS = {  # the grouping a person would draw, for reference
    3: [TOPS, FOOTWEAR, ["Trouser", "Bag"]],
    4: [TOPS, ["Trouser"], FOOTWEAR, ["Bag"]],
    5: [["T-shirt/top", "Pullover", "Coat", "Shirt"], ["Dress"], ["Trouser"], FOOTWEAR, ["Bag"]],
}
METHODS = [
    ("spectral", "spectral (paper)"),
    ("agglomerative", "agglomerative"),
    ("affinity", "affinity (authors' code)"),
    ("auto", "auto (default)"),
]


def planted_confusion(background: float) -> np.ndarray:
    """Row-normalised F with F_ij = F_ji = the planted pair's value, ``background`` elsewhere."""
    ix = {n: i for i, n in enumerate(CLASSES)}
    F = np.full((len(CLASSES), len(CLASSES)), background)
    for (a, b), v in PAIRS.items():
        F[ix[a], ix[b]] = F[ix[b], ix[a]] = v
    np.fill_diagonal(F, 0.0)
    np.fill_diagonal(F, 1.0 - F.sum(axis=1))
    return F


def groups_text(labels: np.ndarray) -> str:
    groups = [[CLASSES[j] for j in np.flatnonzero(labels == k)] for k in np.unique(labels)]
    groups.sort(key=lambda g: CLASSES.index(g[0]))
    return " ".join("{" + ", ".join(SHORT.get(n, n) for n in g) + "}" for g in groups)


def labels_of(groups: list[list[str]]) -> np.ndarray:
    labels = np.empty(len(CLASSES), dtype=np.int64)
    for k, g in enumerate(groups):
        labels[[CLASSES.index(n) for n in g]] = k
    return labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="clustering seeds 0..N-1; the table shows seed 0")
    p.add_argument("--background", type=float, default=0.001, help="confusion of every other pair")
    args = p.parse_args()
    logging.disable(logging.WARNING)  # K=5 of 10 classes warns; the table says it all
    F = planted_confusion(args.background)
    D = distance_matrix(F)
    print(f"command: {' '.join(sys.argv)}\n")
    print("| K | method | groups (seed 0) | confusion kept (11a) | normalised cut (11b) | seeds with the same groups |")
    print("|---:|---|---|---:|---:|---:|")
    for k in (3, 4, 5):
        for method, name in METHODS:
            runs = [cluster_partition(D, k, method=method, seed=s) for s in range(args.seeds)]
            labels, info = runs[0]
            q = info["quality"]
            same = sum(np.array_equal(r[0], labels) for r in runs)
            chosen = f" -> {info['selection']['chosen']}" if "selection" in info else ""
            if q["num_groups"] != k:
                chosen += f" ({q['num_groups']} groups)"
            print(
                f"| {k} | {name}{chosen} | {groups_text(labels)} | {100 * q['confusion_kept']:.1f} % | "
                f"{q['ncut']:.3f} | {same}/{args.seeds} |"
            )
        labels = labels_of(OBVIOUS[k])
        q = partition_scores(F, labels)
        print(
            f"| {k} | (obvious, for reference) | {groups_text(labels)} | {100 * q['confusion_kept']:.1f} % | "
            f"{q['ncut']:.3f} | - |"
        )


if __name__ == "__main__":
    main()

"""HD-CNN's learned category hierarchy (METHODS.md §2.1): plain data, numpy + scikit-learn + matplotlib."""

from coarse2fine.hierarchy.compare import compare_to_reference, mistake_severity, reference_coarse_of
from coarse2fine.hierarchy.learn import (
    CLUSTERING_METHODS,
    COARSE_TARGET_RULES,
    cluster_classes,
    cluster_partition,
    coarse_targets,
    confusion_matrix,
    distance_matrix,
    learn_hierarchy,
    memberships,
    partial_sets,
    partition_scores,
    spectral_affinity,
)
from coarse2fine.hierarchy.plot import plot_hierarchy
from coarse2fine.hierarchy.quality import (
    confusion_kept,
    near_isolated,
    normalised_cut,
    partition_quality,
    quality_warnings,
)
from coarse2fine.hierarchy.structure import Hierarchy, default_coarse_names, load_reference

__all__ = [
    "CLUSTERING_METHODS",
    "COARSE_TARGET_RULES",
    "Hierarchy",
    "cluster_classes",
    "cluster_partition",
    "coarse_targets",
    "compare_to_reference",
    "confusion_kept",
    "confusion_matrix",
    "default_coarse_names",
    "distance_matrix",
    "learn_hierarchy",
    "load_reference",
    "memberships",
    "mistake_severity",
    "near_isolated",
    "normalised_cut",
    "partial_sets",
    "partition_quality",
    "partition_scores",
    "plot_hierarchy",
    "quality_warnings",
    "reference_coarse_of",
    "spectral_affinity",
]


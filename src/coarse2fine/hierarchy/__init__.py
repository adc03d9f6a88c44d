"""HD-CNN's learned category hierarchy (METHODS.md §2.1): plain data, numpy + scikit-learn + matplotlib."""

from coarse2fine.hierarchy.compare import compare_to_reference, mistake_severity, reference_coarse_of
from coarse2fine.hierarchy.learn import (
    COARSE_TARGET_RULES,
    cluster_classes,
    coarse_targets,
    confusion_matrix,
    distance_matrix,
    learn_hierarchy,
    memberships,
    partial_sets,
    spectral_affinity,
)
from coarse2fine.hierarchy.plot import plot_hierarchy
from coarse2fine.hierarchy.structure import Hierarchy, default_coarse_names, load_reference

__all__ = [
    "COARSE_TARGET_RULES",
    "Hierarchy",
    "cluster_classes",
    "coarse_targets",
    "compare_to_reference",
    "confusion_matrix",
    "default_coarse_names",
    "distance_matrix",
    "learn_hierarchy",
    "load_reference",
    "memberships",
    "mistake_severity",
    "partial_sets",
    "plot_hierarchy",
    "reference_coarse_of",
    "spectral_affinity",
]


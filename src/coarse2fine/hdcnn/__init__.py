"""HD-CNN (SPEC 2): the hierarchical network, its loss, the staged pipeline and conditional execution.

The network and the loss import only torch; the pipeline (engine, data, build) is imported on first use.
"""

from typing import Any

from coarse2fine.hdcnn.model import HDCNN, FineComponentNet, FineComponents, find_classifier, split_block
from coarse2fine.hdcnn.objective import HDCNNObjective

_PIPELINE = (
    "StagePaths",
    "build_hdcnn_from_metadata",
    "build_hdcnn_model",
    "evaluate_hdcnn",
    "hdcnn_metadata",
    "hdcnn_param_groups",
    "reference_taxonomy",
    "run_pipeline",
)

__all__ = [
    "HDCNN",
    "FineComponentNet",
    "FineComponents",
    "HDCNNObjective",
    "find_classifier",
    "split_block",
    *_PIPELINE,
]


def __getattr__(name: str) -> Any:
    if name in _PIPELINE:
        from coarse2fine.hdcnn import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

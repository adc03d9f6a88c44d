"""HD-CNN (METHODS.md §2): the hierarchical network, its loss, its inference passes and its part of
compression. The staged training and the report are recipes (``coarse2fine.recipes.hdcnn``)."""

from coarse2fine.hdcnn.compress import compress_hdcnn
from coarse2fine.hdcnn.evaluation import PassResult, inference_pass, peak_memory_bytes, plot_tradeoff
from coarse2fine.hdcnn.model import (
    HDCNN,
    FineComponentNet,
    FineComponents,
    UnrolledHDCNN,
    find_classifier,
    split_block,
)
from coarse2fine.hdcnn.objective import HDCNNObjective

__all__ = [
    "HDCNN",
    "FineComponentNet",
    "FineComponents",
    "HDCNNObjective",
    "PassResult",
    "UnrolledHDCNN",
    "compress_hdcnn",
    "find_classifier",
    "inference_pass",
    "peak_memory_bytes",
    "plot_tradeoff",
    "split_block",
]

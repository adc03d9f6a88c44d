"""coarse2fine: VGG building blocks, HD-CNN and HERBS for classification with hard categories."""

from coarse2fine.errors import C2FError, CheckpointError, ConfigError, DataError, HierarchyError, ModelError

__version__ = "0.1.0"
__all__ = [
    "C2FError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HierarchyError",
    "ModelError",
    "__version__",
]

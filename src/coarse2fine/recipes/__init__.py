"""Recipes: everything a run needs, built from a resolved config, then handed to the engine.

``data`` (datasets, loaders), ``models`` (model + objective per method), ``trained``
(``load_trained`` for every kind of checkpoint), ``train`` (a plain training run), ``hdcnn`` (HD-CNN's
staged pipeline) with ``hdcnn_report``, ``hierarchy`` (learning the category hierarchy) and
``compress`` (product-quantising a checkpoint).
"""

from coarse2fine.recipes.data import (
    SPLIT_CSV,
    DataBundle,
    Loaders,
    build_datasets,
    build_loaders,
    eval_loader,
    evaluate_protocol_on,
    fixed_split,
    native_loader,
    per_rank_batch,
    resolve_image_size,
    save_split,
    transforms_for,
)
from coarse2fine.recipes.models import (
    METHODS,
    build_backbone,
    build_hdcnn_model,
    build_model_and_objective,
)
from coarse2fine.recipes.train import RunCheck, RunReport, check_run, save_resolved_config, train_run
from coarse2fine.recipes.trained import Trained, load_trained

__all__ = [
    "METHODS",
    "SPLIT_CSV",
    "DataBundle",
    "Loaders",
    "RunCheck",
    "RunReport",
    "Trained",
    "build_backbone",
    "build_datasets",
    "build_hdcnn_model",
    "build_loaders",
    "build_model_and_objective",
    "check_run",
    "eval_loader",
    "evaluate_protocol_on",
    "fixed_split",
    "load_trained",
    "native_loader",
    "per_rank_batch",
    "resolve_image_size",
    "save_resolved_config",
    "save_split",
    "train_run",
    "transforms_for",
]

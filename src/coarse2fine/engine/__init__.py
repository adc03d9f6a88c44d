"""Training and evaluation of any model through one interface (docs/ARCHITECTURE.md, training contract)."""

from coarse2fine.engine.callbacks import (
    Callback,
    CSVLogger,
    LogSettings,
    MLflowLogger,
    TensorBoardLogger,
    WandbLogger,
    default_callbacks,
)
from coarse2fine.engine.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from coarse2fine.engine.evaluate import EvalResult, evaluate, predict_proba, save_eval_artifacts
from coarse2fine.engine.objective import CrossEntropyObjective, Objective
from coarse2fine.engine.optim import build_optimizer, build_scheduler
from coarse2fine.engine.run_folder import FitState, RunFolder
from coarse2fine.engine.trainer import FitResult, FitSetup, NonFiniteLossError, TrainingInterrupted, fit

__all__ = [
    "CSVLogger",
    "Callback",
    "CrossEntropyObjective",
    "EvalResult",
    "FitResult",
    "FitSetup",
    "FitState",
    "LogSettings",
    "MLflowLogger",
    "NonFiniteLossError",
    "Objective",
    "RunFolder",
    "TensorBoardLogger",
    "TrainingInterrupted",
    "WandbLogger",
    "build_optimizer",
    "build_scheduler",
    "check_compatible",
    "default_callbacks",
    "evaluate",
    "fit",
    "load_checkpoint",
    "predict_proba",
    "save_checkpoint",
    "save_eval_artifacts",
]

"""Training and evaluation of any model through one interface (docs/ARCHITECTURE.md, training contract)."""

from coarse2fine.engine.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from coarse2fine.engine.evaluate import EvalResult, evaluate, predict_proba, save_eval_artifacts
from coarse2fine.engine.objective import CrossEntropyObjective, Objective
from coarse2fine.engine.optim import build_optimizer, build_scheduler
from coarse2fine.engine.trainer import FitResult, NonFiniteLossError, TrainingInterrupted, fit

__all__ = [
    "CrossEntropyObjective",
    "EvalResult",
    "FitResult",
    "NonFiniteLossError",
    "Objective",
    "TrainingInterrupted",
    "build_optimizer",
    "build_scheduler",
    "check_compatible",
    "evaluate",
    "fit",
    "load_checkpoint",
    "predict_proba",
    "save_checkpoint",
    "save_eval_artifacts",
]

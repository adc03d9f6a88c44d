"""Hooks on the training loop, and the loggers built on them (docs/ARCHITECTURE.md, training contract).

``fit`` calls every hook on every rank; the loggers here write on rank 0 only. A logger is a
``Callback`` class taking the ``RunFolder``, registered by name in ``LOGGERS``;
``default_callbacks(run)`` builds the ones ``fit`` uses when the caller passes none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coarse2fine.engine import distributed as du
from coarse2fine.engine.run_folder import FitState, RunFolder
from coarse2fine.errors import ConfigError

log = logging.getLogger(__name__)


class Callback:
    """Override the hooks you need; each default does nothing."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch, after a resume restored ``state``."""

    def on_step_end(self, step: int, values: Mapping[str, float]) -> None:
        """After every ``train.log_every``-th optimizer step: ``values`` holds ``loss`` and ``lr``."""

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        """After epoch ``epoch`` (1-based) was validated and checkpointed: ``record`` is its metrics row."""

    def on_fit_end(self, state: FitState, error: BaseException | None) -> None:
        """Always, last: ``error`` is what stopped training (None when it finished)."""


class CSVLogger(Callback):
    """``metrics.csv``: rewritten after every epoch with the whole history (resumed rows included)."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.rows: list[dict[str, Any]] = []

    def on_fit_start(self, state: FitState) -> None:
        self.rows = list(state.history)

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        self.rows.append(dict(record))
        self.run.write_metrics(self.rows)


class TensorBoardLogger(Callback):
    """Scalars under ``tb/``: ``step/loss``, ``step/lr`` and ``epoch/<column>`` (rank 0)."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.writer: Any = None

    def on_fit_start(self, state: FitState) -> None:
        if not du.is_main_process():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # slow to import: only when training
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed: no TensorBoard logs")
            return
        purge = state.global_step if self.run.resume else None  # drop steps logged after last.pt
        self.writer = SummaryWriter(str(self.run.tb), purge_step=purge)

    def _scalars(self, values: Mapping[str, Any], step: int, prefix: str) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def on_step_end(self, step: int, values: Mapping[str, float]) -> None:
        self._scalars(values, step, "step")

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        self._scalars(record, epoch, "epoch")

    def on_fit_end(self, state: FitState, error: BaseException | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


LOGGERS: dict[str, Callable[[RunFolder], Callback]] = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
DEFAULT_LOGGERS = ("csv", "tensorboard")


def default_callbacks(run: RunFolder, loggers: Sequence[str] = DEFAULT_LOGGERS) -> list[Callback]:
    """The loggers named ``loggers`` (keys of ``LOGGERS``), each writing into ``run``."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"unknown logger(s) {', '.join(map(repr, unknown))}; choose from {', '.join(LOGGERS)}")
    return [LOGGERS[name](run) for name in loggers]

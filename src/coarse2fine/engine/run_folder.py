"""The run folder of one ``fit``: where its checkpoints, metrics and fault records live.

Layout (docs/ARCHITECTURE.md, training contract)::

    <root>/config.yaml                  the resolved recipe (when given), once the run was accepted
    <root>/checkpoints/last.pt          after every completed epoch (and once before the first)
    <root>/checkpoints/best.pt          the epoch with the best validation top-1
    <root>/checkpoints/epoch_XXX.pt     the last ``train.keep_checkpoints`` epochs
    <root>/checkpoints/interrupted.json what a SIGINT/SIGTERM stopped, and how to resume
    <root>/metrics.csv                  one row per completed epoch
    <root>/tb/                          TensorBoard scalars

Only rank 0 writes; every write is atomic (``engine.checkpoint``). Nothing is written before ``open``
has accepted the run (settings, data and model are built before ``fit`` opens the folder), so a refused
run leaves an existing folder, its ``config.yaml`` included, as it was.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from coarse2fine.engine import distributed as du
from coarse2fine.engine.checkpoint import (
    atomic_copy,
    atomic_write_json,
    atomic_write_text,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from coarse2fine.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class FitState:
    """A run's progress: what a checkpoint restores besides module states."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    best_metric: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> FitState:
        return cls(ckpt["epoch"], ckpt["global_step"], ckpt["best_metric"], ckpt["best_epoch"], list(ckpt["history"]))

    def end_epoch(self, record: dict[str, Any], metric: float) -> bool:
        """Count a completed epoch; True when ``metric`` (validation top-1) is the best so far."""
        self.epoch = record["epoch"]
        self.history.append(record)
        if metric > self.best_metric:
            self.best_metric, self.best_epoch = metric, self.epoch
            return True
        return False


class RunChecked(Exception):  # not a C2FError: the outcome of a dry run, not a failure
    """Raised by ``RunFolder.open`` in a dry run once the run was accepted, before anything is written;
    ``decision`` says what a real run would do ("start", "resume after epoch 3", ...)."""

    def __init__(self, decision: str) -> None:
        super().__init__(decision)
        self.decision = decision


class RunFolder:
    """The directory ``root`` of one run and how ``fit`` opens it.

    ``resume``: continue from ``checkpoints/last.pt`` (a fresh start, with a warning, when there is none).
    ``overwrite``: allow a fresh run over an existing ``last.pt`` (otherwise refused); the previous run's
    files are removed once the new run was accepted.
    ``resume_hint``: the command that resumes this run (in the interrupted record and its error).
    ``config``: the resolved recipe, written to ``config.yaml`` once ``open`` accepted the run; ``files``:
    other text files written beside it then (name -> content, e.g. the data split ``split.csv``).
    ``dry_run``: ``open`` decides (and checks a checkpoint to resume), then raises ``RunChecked``.
    """

    def __init__(
        self,
        root: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        resume_hint: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> None:
        self.root = Path(root)
        self.resume, self.overwrite, self.resume_hint = resume, overwrite, resume_hint
        self.config, self.files, self.dry_run = config, dict(files or {}), dry_run
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.interrupted = self.checkpoints / "interrupted.json"
        self.metrics = self.root / "metrics.csv"
        self.tb = self.root / "tb"
        self.config_file = self.root / "config.yaml"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r}, resume={self.resume}, overwrite={self.overwrite})"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.pt"

    @property
    def started(self) -> bool:
        """A run was started here (it has a ``last.pt``)."""
        return self.last.is_file()

    @property
    def hint(self) -> str:
        return self.resume_hint or (
            f"run the same command again with resume enabled (RunFolder(..., resume=True), root={self.root})"
        )

    def open(self, classes: Sequence[str], model: nn.Module) -> dict[str, Any] | None:
        """Start, resume or refuse: the checkpoint to resume from, or None for a fresh start.

        Every rank decides before rank 0 writes anything. Resuming checks that ``last.pt`` was trained
        on ``classes`` with ``model``'s architecture and removes a stale interrupted record. A fresh start
        over a ``last.pt`` is refused unless ``overwrite`` is set or that run never completed an epoch
        (it stopped in its first one); then the previous run's files are removed. ``config.yaml`` is
        written only here, after the run was accepted.
        """
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"run folder {self.root} exists and is not a folder")
        have_last = self.started
        du.barrier()
        if self.resume and have_last:
            ckpt = load_checkpoint(self.last)
            check_compatible(ckpt, classes, model, self.last)
            self._accept(f"resume after epoch {ckpt['epoch']}")
            log.info("resumed from %s after epoch %d", self.last, ckpt["epoch"])
            if du.is_main_process() and self.interrupted.exists():
                self.interrupted.unlink()
            self._write_config()
            return ckpt
        replace = have_last and not self.resume
        if self.resume:
            log.warning("resume requested but %s does not exist: starting from scratch", self.last)
        elif replace and not self.overwrite:
            if self._completed_epochs() != 0:
                raise CheckpointError(
                    f"{self.last} already exists: resume that run (--resume), start it afresh (--overwrite), "
                    "or choose another run name / out_dir"
                )
            log.info("%s holds no completed epoch (that run stopped in its first epoch): starting afresh", self.last)
        self._accept("start afresh, replacing the previous run" if replace else "start")
        if replace:
            self._remove_previous_run()
        self._write_config()
        return None

    def _accept(self, decision: str) -> None:
        if self.dry_run:
            raise RunChecked(decision)

    def _completed_epochs(self) -> int | None:
        """Epochs completed by the run in ``last.pt`` (None when it cannot be read)."""
        try:
            return int(load_checkpoint(self.last).get("epoch", -1))
        except (CheckpointError, TypeError, ValueError):
            return None

    def _remove_previous_run(self) -> None:
        """Rank 0 empties the folder of the run being replaced: checkpoints, metrics, TensorBoard events,
        evaluation outputs. Only entries inside ``root`` are touched (a symbolic link is removed, never
        followed); a sub-folder holding a run of its own (``checkpoints/last.pt`` or ``config.yaml``) is kept."""
        if not du.is_main_process() or not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink()
            elif (entry / "checkpoints" / "last.pt").is_file() or (entry / "config.yaml").is_file():
                log.warning("kept %s: it holds a run of its own", entry)
            else:
                shutil.rmtree(entry)
        log.info("removed the previous run's files from %s", self.root)

    def _write_config(self) -> None:
        if not du.is_main_process():
            return
        if self.config is not None:
            atomic_write_text(self.config_file, yaml.safe_dump(dict(self.config), sort_keys=False))
        for name, text in self.files.items():
            atomic_write_text(self.root / name, text)

    def save_last(self, state: Mapping[str, Any]) -> None:
        """``last.pt`` (rank 0)."""
        if du.is_main_process():
            save_checkpoint(state, self.last)

    def save_epoch(
        self, state: Mapping[str, Any], epoch: int, is_best: bool, keep: int, best: Mapping[str, Any] | None = None
    ) -> None:
        """``last.pt``, ``epoch_XXX.pt`` (the last ``keep`` of them) and, if ``is_best``, ``best.pt`` (rank 0):
        a copy of ``last.pt``, or ``best`` when given (e.g. the EMA weights as its model)."""
        if not du.is_main_process():
            return
        save_checkpoint(state, self.last)
        atomic_copy(self.last, self.epoch_checkpoint(epoch))
        if is_best and best is not None:
            save_checkpoint(best, self.best)
        elif is_best:
            atomic_copy(self.last, self.best)
        self._prune(keep)

    def _prune(self, keep: int) -> None:
        epochs = sorted(self.checkpoints.glob("epoch_*.pt"))
        for old in epochs[: max(0, len(epochs) - max(keep, 0))]:
            old.unlink(missing_ok=True)

    def write_metrics(self, history: Sequence[Mapping[str, Any]]) -> None:
        """``metrics.csv``: one row per record, the union of their keys as columns (rank 0)."""
        if not du.is_main_process():
            return
        columns: list[str] = []
        for rec in history:
            columns += [k for k in rec if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")  # csv's default is \r\n
        writer.writeheader()
        for rec in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in rec.items()})
        atomic_write_text(self.metrics, buf.getvalue())

    def mark_interrupted(self, signal_name: str, in_epoch: int, state: FitState) -> None:
        """``checkpoints/interrupted.json`` (rank 0): the signal, the epoch it stopped, how to resume."""
        if du.is_main_process():
            record = {
                "signal": signal_name,
                "interrupted_in_epoch": in_epoch,
                "last_completed_epoch": state.epoch,
                "global_step": state.global_step,
                "checkpoint": str(self.last),
                "resume": self.hint,
            }
            atomic_write_json(self.interrupted, record)

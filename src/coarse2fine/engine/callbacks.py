"""Hooks on the training loop, and the loggers built on them (docs/ARCHITECTURE.md, training contract).

``fit`` calls every hook on every rank; the loggers here write on rank 0 only. A logger is built from
the ``RunFolder`` and the ``LogSettings`` by a factory registered by name in ``LOGGERS``;
``default_callbacks(run, loggers, settings)`` builds the ones ``fit`` uses when the caller passes none
(``train.loggers``). The MLflow and W&B loggers import their package when built, so a missing package is
a ``ConfigError`` before the run folder is opened (nothing written).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coarse2fine.engine import distributed as du
from coarse2fine.engine.checkpoint import atomic_write_json
from coarse2fine.engine.run_folder import FitState, RunFolder
from coarse2fine.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogSettings:
    """What the experiment trackers need besides the run folder (``train.mlflow_uri``, ``train.experiment``,
    ``train.wandb_mode``, and the resolved recipe as the run's parameters)."""

    mlflow_uri: str | None = None  # None: a file store in the run folder, <run>/mlruns
    experiment: str | None = None  # MLflow experiment / W&B project; None: the recipe's name (or the folder's)
    wandb_mode: str = "offline"  # offline | online | disabled
    params: Mapping[str, Any] = field(default_factory=dict)  # nested sections, e.g. {"optim": {"lr": 0.1}}

    def experiment_of(self, run: RunFolder) -> str:
        """``experiment``, else the run's name: the recipe's ``name`` (HD-CNN stages share it), else the folder's."""
        name = self.params.get("name")
        return self.experiment or (name if isinstance(name, str) and name else run.root.name)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (lists and scalars are values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _numbers(values: Mapping[str, Any], skip: Sequence[str] = ()) -> Iterator[tuple[str, float]]:
    """The numeric (not boolean) entries of ``values`` as floats, keys outside ``skip``."""
    for k, v in values.items():
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool):
            yield k, float(v)


def _missing(package: str, logger: str, pip: str) -> ConfigError:
    return ConfigError(
        f"train.loggers: {logger!r} needs the {package} package, which is not installed: run `pip install {pip}` "
        f"(or `pip install 'coarse2fine[{logger}]'`), or remove {logger} from train.loggers"
    )


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


def _stored_run(path: Path) -> dict[str, Any]:
    """The tracker run a resumed run continues (``<run>/mlflow_run.json``, ``wandb_run.json``); {} if none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class MLflowLogger(Callback):
    """An MLflow run (rank 0): the resolved recipe as parameters (``section.key``), the epoch records as
    metrics (step = epoch; ``step/loss``, ``step/lr`` per ``train.log_every`` steps), and at the end ``best.pt``
    (under ``checkpoints/``), ``metrics.csv``, ``config.yaml`` and the pictures of the run folder as
    artifacts; the run ends FINISHED, or FAILED when training raised.

    ``settings.mlflow_uri`` None: a file store in the run folder (``<run>/mlruns``; browse it with
    ``mlflow ui --backend-store-uri <that file:// URI>``). A resumed run (``--resume``) continues the MLflow
    run it started (its id is kept in ``<run>/mlflow_run.json``) when that run is still in the same store.
    """

    def __init__(self, run: RunFolder, settings: LogSettings) -> None:
        try:
            import mlflow  # optional dependency: only when this logger is chosen
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
            from mlflow.utils import validation
        except ImportError:
            raise _missing("mlflow", "mlflow", "mlflow-skinny") from None
        self.run, self.settings = run, settings
        self._Metric, self._Param, self._Client = Metric, Param, MlflowClient
        self.max_value = getattr(validation, "MAX_PARAM_VAL_LENGTH", 500)
        self.max_key = getattr(validation, "MAX_ENTITY_KEY_LENGTH", 250)
        self.version = mlflow.__version__
        self.client: Any = None
        self.run_id: str | None = None

    @property
    def uri(self) -> str:
        return self.settings.mlflow_uri or (self.run.root / "mlruns").resolve().as_uri()

    def on_fit_start(self, state: FitState) -> None:
        if not du.is_main_process():
            return
        if self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow 3 keeps its file store, in maintenance mode, behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self._Client(tracking_uri=self.uri)
        name = self.settings.experiment_of(self.run)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        self.run_id = self._resumed(experiment_id) if self.run.resume else None
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "c2f.resumed_after_epoch", str(state.epoch))
            log.info("MLflow %s: run %s continued at %s", self.version, self.run_id, self.uri)
            return
        tags = {"c2f.run_dir": str(self.run.root), "c2f.resumed_after_epoch": str(state.epoch)}
        created = self.client.create_run(experiment_id, run_name=self.run.root.name, tags=tags)
        self.run_id = created.info.run_id
        atomic_write_json(self.run.root / "mlflow_run.json", {"uri": self.uri, "run_id": self.run_id})
        params = [
            self._Param(str(k)[: self.max_key], str(v)[: self.max_value])
            for k, v in flatten(self.settings.params).items()
        ]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        log.info("MLflow %s: run %s in experiment %r at %s", self.version, self.run_id, name, self.uri)

    def _resumed(self, experiment_id: str) -> str | None:
        """The stored run's id when it is in this store and experiment, else None (a new run is started)."""
        stored = _stored_run(self.run.root / "mlflow_run.json")
        if stored.get("uri") != self.uri or not isinstance(stored.get("run_id"), str):
            return None
        try:
            found = self.client.get_run(stored["run_id"])
        except Exception:  # deleted, or the store was moved: MLflow raises its own exception types
            return None
        return stored["run_id"] if found.info.experiment_id == experiment_id else None

    def _log(self, values: Mapping[str, Any], step: int, prefix: str = "", skip: Sequence[str] = ()) -> None:
        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [
            self._Metric(re.sub(r"[^\w\-. /]", "_", f"{prefix}{k}")[: self.max_key], v, now, step)
            for k, v in _numbers(values, skip)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_step_end(self, step: int, values: Mapping[str, float]) -> None:
        self._log(values, step, prefix="step/")

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        self._log(record, epoch, skip=("epoch",))

    def artifacts(self) -> list[tuple[Path, str | None]]:
        """(file, folder in the run's artifacts) of what exists now: best.pt, metrics.csv, config.yaml, *.png."""
        root = self.run.root
        files: list[tuple[Path, str | None]] = [(self.run.best, "checkpoints")]
        files += [(root / name, None) for name in ("metrics.csv", "config.yaml")]
        files += [(png, None) for png in sorted(root.glob("*.png"))]
        return [(path, folder) for path, folder in files if path.is_file()]

    def on_fit_end(self, state: FitState, error: BaseException | None) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        try:
            for path, folder in self.artifacts():
                self.client.log_artifact(run_id, str(path), folder)
        except Exception as exc:  # the run still ends, with its status; the files stay in the run folder
            log.warning("MLflow: could not store the artifacts of run %s: %s", run_id, exc)
        finally:
            self.client.set_terminated(run_id, "FAILED" if error is not None else "FINISHED")


class WandbLogger(Callback):
    """A Weights & Biases run (rank 0), in ``settings.wandb_mode`` (default offline: files under
    ``<run>/wandb``, uploaded later by ``wandb sync``): the resolved recipe as its config, ``epoch/<column>``
    per epoch and ``step/loss``, ``step/lr`` per ``train.log_every`` steps, and at the end ``best.pt`` as a
    model artifact and ``metrics.csv``, ``config.yaml`` and the pictures as run files. A resumed run continues
    the W&B run it started (``resume="allow"`` with the id kept in ``<run>/wandb_run.json``)."""

    def __init__(self, run: RunFolder, settings: LogSettings) -> None:
        try:
            import wandb  # optional dependency: only when this logger is chosen
        except ImportError:
            raise _missing("wandb", "wandb", "wandb") from None
        self.run, self.settings, self.wandb = run, settings, wandb
        self.wb: Any = None

    def on_fit_start(self, state: FitState) -> None:
        if not du.is_main_process():
            return
        self.run.root.mkdir(parents=True, exist_ok=True)
        stored = _stored_run(self.run.root / "wandb_run.json").get("id") if self.run.resume else None
        resume = {"id": stored, "resume": "allow"} if isinstance(stored, str) else {}
        self.wb = self.wandb.init(
            project=self.settings.experiment_of(self.run),
            name=self.run.root.name,
            dir=str(self.run.root),
            mode=self.settings.wandb_mode,
            config=dict(self.settings.params),
            **resume,
        )
        atomic_write_json(self.run.root / "wandb_run.json", {"id": self.wb.id})
        self.wb.define_metric("global_step")
        self.wb.define_metric("step/*", step_metric="global_step")
        self.wb.define_metric("epoch")
        self.wb.define_metric("epoch/*", step_metric="epoch")

    def on_step_end(self, step: int, values: Mapping[str, float]) -> None:
        if self.wb is not None:
            self.wb.log({"global_step": step, **{f"step/{k}": v for k, v in _numbers(values)}})

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        if self.wb is not None:
            self.wb.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in _numbers(record, ("epoch",))}})

    def on_fit_end(self, state: FitState, error: BaseException | None) -> None:
        if self.wb is None:
            return
        wb, self.wb = self.wb, None
        try:
            if self.run.best.is_file():
                artifact = self.wandb.Artifact(re.sub(r"[^\w\-.]", "_", f"{self.run.root.name}-best"), type="model")
                artifact.add_file(str(self.run.best))
                wb.log_artifact(artifact)
            for path in [self.run.metrics, self.run.config_file, *sorted(self.run.root.glob("*.png"))]:
                if path.is_file():
                    wb.save(str(path), base_path=str(self.run.root), policy="now")
        except Exception as exc:  # the run still ends; the files stay in the run folder
            log.warning("W&B: could not store the files of the run: %s", exc)
        finally:
            wb.finish(exit_code=1 if error is not None else 0)


LoggerFactory = Callable[[RunFolder, LogSettings], Callback]
LOGGERS: dict[str, LoggerFactory] = {
    "csv": lambda run, settings: CSVLogger(run),
    "tensorboard": lambda run, settings: TensorBoardLogger(run),
    "mlflow": MLflowLogger,
    "wandb": WandbLogger,
}
DEFAULT_LOGGERS = ("csv", "tensorboard")


def default_callbacks(
    run: RunFolder, loggers: Sequence[str] = DEFAULT_LOGGERS, settings: LogSettings | None = None
) -> list[Callback]:
    """The loggers named ``loggers`` (keys of ``LOGGERS``), each writing into ``run``; a logger whose
    package is missing is a ``ConfigError`` here (building one writes nothing)."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"train.loggers: unknown logger(s) {', '.join(map(repr, unknown))}; choose from {', '.join(LOGGERS)}"
        )
    settings = settings if settings is not None else LogSettings()
    return [LOGGERS[name](run, settings) for name in loggers]

"""The training loop: one flat loop for every model (after torchvision's reference ``train.py``).

Any model whose output follows the training contract (docs/ARCHITECTURE.md: logits tensor, or dict
with ``"logits"`` and optional ``"heads"``) is trained with any ``Objective`` (named terms, total
under ``"loss"``). ``fit`` builds the optimizer, schedule and scaler, opens the ``RunFolder``
(start, resume or refuse), then runs the epochs; checkpoints, metrics and TensorBoard scalars go to
the run folder and the callbacks (``engine.callbacks``).

Faults:
- SIGINT/SIGTERM: the current step finishes, then training stops; ``last.pt`` is the last *completed*
  epoch (the partial epoch is dropped and replayed identically on resume), ``checkpoints/interrupted.json``
  records what happened, and ``TrainingInterrupted`` is raised with the resume hint. A second SIGINT
  stops at once (``KeyboardInterrupt``).
- Non-finite loss: ``nan_policy="stop"`` raises ``NonFiniteLossError`` naming epoch and step, leaving the
  checkpoints of the last good epoch untouched; ``"skip"`` drops that batch (counted in
  ``skipped_steps``).
- Resume: ``RunFolder(resume=True)`` restores model, optimizer, scheduler, scaler, RNG, epoch and history
  (and the EMA weights) from ``last.pt``. Every epoch reseeds torch/numpy/random from ``(seed, epoch, rank)``,
  so on the CPU in deterministic mode the resumed run ends with the same weights as an uninterrupted one.

Options of any run (no method knows of them):
- ``FitSetup.batch_transform(images, targets) -> (images, targets)``: applied to every training batch on the
  device (random erasing, Mixup/CutMix: ``data.TrainBatchTransform``); targets may come back soft
  ``(B, C)``, which the objective must take (``CrossEntropyObjective`` does) and the training accuracy
  counts by their argmax.
- ``train.ema_decay``: an EMA of the weights (timm ``ModelEmaV3``), updated after every optimizer step,
  validated every epoch (``val_ema_top1``, ``val_ema_top5``) and saved under ``"ema"`` in every checkpoint;
  ``train.best_on="ema"`` chooses ``best.pt`` on the EMA's validation top-1 and stores the EMA weights as
  its ``"model"`` (so ``load_trained`` gives the EMA model).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coarse2fine.config import OptimConfig, RunConfig, ScheduleConfig, TrainConfig, to_dict, validate
from coarse2fine.data.transforms import train_batch_transform
from coarse2fine.engine import distributed as du
from coarse2fine.engine.callbacks import Callback, LogSettings, default_callbacks
from coarse2fine.engine.checkpoint import plain_data, rng_state, set_rng_state
from coarse2fine.engine.evaluate import (
    EvalResult,
    apply_threads,
    autocast,
    autocast_dtype,
    evaluate,
    resolve_device,
    to_device,
)
from coarse2fine.engine.objective import Objective, logits_of
from coarse2fine.engine.optim import Scheduler, build_optimizer, build_scheduler
from coarse2fine.engine.progress import progress
from coarse2fine.engine.run_folder import FitState, RunFolder
from coarse2fine.errors import C2FError, ConfigError

log = logging.getLogger(__name__)


class TrainingInterrupted(C2FError):
    """SIGINT/SIGTERM stopped training after a clean checkpoint; the message says how to resume."""

    def __init__(self, message: str, *, checkpoint: Path, epoch: int, signal_name: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.signal_name = signal_name


class NonFiniteLossError(C2FError):
    """The loss became NaN or infinite (``nan_policy="stop"``)."""


@dataclass(frozen=True)
class FitSetup:
    """How to train: the settings, the class list, and what every checkpoint records besides the states."""

    train: TrainConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    classes: Sequence[str]
    seed: int = 0  # epoch seeds are (seed, epoch, rank)
    config: Mapping[str, Any] = field(default_factory=dict)  # the resolved recipe (checkpoint "config")
    metadata: Mapping[str, Any] = field(default_factory=dict)  # plain data (checkpoint "metadata")
    param_groups: Iterable[Any] | None = None  # optimizer groups; None: all of the model's parameters
    desc: str = "train"  # progress-bar label
    progress: bool = True
    # applied to every training batch on the device: (images, targets) -> (images, targets), soft targets allowed
    batch_transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    @classmethod
    def from_run_config(
        cls,
        cfg: RunConfig,
        classes: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        param_groups: Iterable[Any] | None = None,
        desc: str = "train",
        progress: bool = True,
    ) -> FitSetup:
        """The settings, seed and resolved config of ``cfg``; the batch transform of its ``data`` settings
        (``random_erase``, ``mixup_alpha``, ``cutmix_alpha``: ``data.train_batch_transform``)."""
        batch_transform = train_batch_transform(cfg.data, len(classes), cfg.train.label_smoothing)
        return cls(
            cfg.train, cfg.optim, cfg.schedule, list(classes), cfg.seed, to_dict(cfg), dict(metadata or {}),
            param_groups, desc, progress, batch_transform,
        )  # fmt: skip


@dataclass
class FitResult:
    best_epoch: int  # 1-based epoch with the best validation top-1 (0: none completed)
    best_val_top1: float
    history: list[dict[str, Any]]  # one record per completed epoch (the rows of metrics.csv)
    run: RunFolder

    @property
    def last_checkpoint(self) -> Path:
        return self.run.last

    @property
    def best_checkpoint(self) -> Path:
        return self.run.best


# ---- helpers -------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of epoch ``epoch`` on rank ``rank`` (torch, numpy and Python RNGs)."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(1, dtype=np.uint32)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StopRequest(contextlib.AbstractContextManager["_StopRequest"]):
    """Turns SIGINT/SIGTERM into a flag checked after every step (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    @property
    def asked(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


@dataclass
class Training:
    """What ``fit`` builds before the loop; ``train_one_epoch`` runs on it."""

    model: nn.Module  # compiled and DDP-wrapped once the run folder is opened
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    setup: FitSetup
    run: RunFolder
    device: torch.device
    dtype: torch.dtype | None
    stop: _StopRequest
    callbacks: Sequence[Callback]
    ema: Any = None  # timm ModelEmaV3 (train.ema_decay), or None
    state: FitState = field(default_factory=FitState)


# ---- one epoch -----------------------------------------------------------------------------------


@dataclass
class EpochOut:
    record: dict[str, Any]  # the epoch's averaged terms, accuracy, skipped steps and throughput
    stopped: bool = False  # a signal stopped the epoch before its last batch


def train_one_epoch(t: Training, loader: Any, epoch: int) -> EpochOut:
    """Train ``epoch`` (0-based): forward, loss, backward, and a step every ``train.accumulate`` batches."""
    cfg = t.setup.train
    t.model.train()
    n = len(loader)
    meter = _EpochMeter(t.device)
    enabled = t.setup.progress and du.is_main_process()
    bar = progress(loader, total=n, desc=f"{t.setup.desc} {epoch + 1}/{cfg.epochs}", enabled=enabled)
    in_window = 0  # batches backpropagated in the current accumulation window
    stopped = False
    t.optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar):
        images, targets = to_device(images, targets, t.device, cfg.channels_last)
        if t.setup.batch_transform is not None:
            images, targets = t.setup.batch_transform(images, targets)
        window_end = (i + 1) % cfg.accumulate == 0 or i + 1 == n
        with _grad_sync(t.model, window_end):
            with autocast(t.device, t.dtype):
                outputs = t.model(images)
                terms = t.objective(outputs, targets)
            loss = terms["loss"]
            non_finite, stop = _any_rank(loss, t.stop)
            if non_finite:
                _apply_nan_policy(t, loss, epoch, i, n)
                meter.skipped += 1
            else:
                window = min(cfg.accumulate, n - (i // cfg.accumulate) * cfg.accumulate)
                t.scaler.scale(loss / window).backward()
                in_window += 1
                meter.add(terms, outputs, targets)
        if window_end:
            if in_window > 0:
                _optimizer_step(t, average=non_finite)
                _log_step(t, loss)
            else:
                t.optimizer.zero_grad(set_to_none=True)  # the whole window was skipped
            in_window = 0
        if bar.due(i):
            bar.set_postfix(meter.postfix(loss))
        if stop and i + 1 < n:
            stopped = True  # a stop on the last batch lets the epoch complete (and be checkpointed)
            break
    bar.close()
    return EpochOut(meter.record(), stopped)


class _EpochMeter:
    """This rank's running sums of the loss terms and accuracy; ``record`` all-reduces them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0
        self.skipped = 0  # the same on every rank (the non-finite flag is all-reduced)
        self.start = time.perf_counter()

    def add(self, terms: Mapping[str, Tensor], outputs: Any, targets: Tensor) -> None:
        bs = targets.shape[0]
        self.seen += bs
        for k, v in terms.items():
            v = v.detach().float()
            if v.ndim == 0:
                self.sums[k] = self.sums.get(k, torch.zeros((), device=self.device)) + v * bs
        hard = targets.argmax(1) if targets.ndim == 2 else targets  # soft (mixed) targets: their main class
        self.correct += (logits_of(outputs).detach().argmax(1) == hard).sum()

    def postfix(self, loss: Tensor) -> dict[str, str]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "loss": f"{float(loss.detach()):.4f}",
            "acc": f"{int(self.correct) / max(self.seen, 1):.3f}",
            "img/s": f"{self.seen / elapsed:.0f}",
        }

    def record(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.start
        names = sorted(self.sums)
        seen = torch.tensor(float(self.seen), device=self.device)
        packed = torch.stack([*(self.sums[k] for k in names), self.correct.float(), seen]).double()
        sums = du.all_reduce_sum(packed).tolist()
        total = sums[-1]
        record: dict[str, Any] = {f"train_{k}": s / total if total else float("nan") for k, s in zip(names, sums)}
        record["train_top1"] = sums[len(names)] / total if total else 0.0
        record["skipped_steps"] = self.skipped
        record["train_seconds"] = seconds
        record["images_per_s"] = total / seconds if seconds > 0 else 0.0
        return record


def _grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP all-reduces gradients only on the backward that ends an accumulation window."""
    if sync or du.world_size() == 1:
        return contextlib.nullcontext()
    return model.no_sync()  # type: ignore[operator]


def _any_rank(loss: Tensor, stop: _StopRequest) -> tuple[bool, bool]:
    """(any rank's loss is non-finite, any rank was asked to stop): one all-reduce, so ranks act alike."""
    bad = (~torch.isfinite(loss.detach())).float()
    flags = du.all_reduce_max(torch.stack([bad, torch.full_like(bad, float(stop.asked))])).tolist()
    return flags[0] > 0, flags[1] > 0


def _apply_nan_policy(t: Training, loss: Tensor, epoch: int, i: int, n: int) -> None:
    """``nan_policy="stop"``: raise, naming the step and the last good checkpoint; ``"skip"``: return."""
    if t.setup.train.nan_policy == "stop":
        raise NonFiniteLossError(
            f"non-finite loss ({float(loss.detach()):.4g}) at epoch {epoch + 1}, step {i + 1} of "
            f"{n} (global step {t.state.global_step}); {t.run.last} holds the last good "
            f"epoch ({t.state.epoch}); lower the learning rate (--set optim.lr={t.setup.optim.lr / 10:g}), "
            "clip gradients (--set train.grad_clip=1.0) or skip such steps (--set train.nan_policy=skip)"
        )


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _optimizer_step(t: Training, average: bool) -> None:
    """Clip, step, update the scaler and the per-step schedule.

    ``average``: the window's last batch was skipped, so DDP's backward all-reduce did not run; do it here.
    """
    clip = t.setup.train.grad_clip
    if average and du.world_size() > 1:
        size = du.world_size()
        for p in _params(t.optimizer):
            if p.grad is not None:
                du.all_reduce_sum(p.grad).div_(size)
    if clip is not None and clip > 0:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(_params(t.optimizer), clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step_update()
    t.state.global_step += 1
    if t.ema is not None:
        t.ema.update(du.unwrap(t.model), step=t.state.global_step)  # the first update copies the weights


def _log_step(t: Training, loss: Tensor) -> None:
    every, step = t.setup.train.log_every, t.state.global_step
    if every > 0 and step % every == 0:
        values = {"loss": float(loss.detach()), "lr": t.optimizer.param_groups[0]["lr"]}
        for cb in t.callbacks:
            cb.on_step_end(step, values)


# ---- fit -----------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: Any,
    val_loader: Any,
    setup: FitSetup,
    run: RunFolder,
    callbacks: Sequence[Callback] | None = None,
) -> FitResult:
    """Train ``model`` for ``setup.train.epochs`` epochs, validating and checkpointing each in ``run``.

    ``callbacks``: the hooks to call (None: the loggers of ``train.loggers``, built before the run folder
    is opened, so a logger whose package is missing fails before anything is written).
    """
    cfg = setup.train
    for section, where in ((setup.train, "train"), (setup.optim, "optim"), (setup.schedule, "schedule")):
        validate(section, where)  # settings built in Python get the checks a loaded recipe gets
    if len(train_loader) == 0:
        n = getattr(train_loader, "num_samples", None) or len(getattr(train_loader, "dataset", ()))
        raise ConfigError(
            f"the training loader yields no batch: data.batch_size is larger than the {n} training images "
            f"(of this process); lower it, e.g. --set data.batch_size={max(1, n)}"
        )
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.amp, device)
    apply_threads(cfg.threads)
    callbacks = default_callbacks(run, cfg.loggers, log_settings(setup)) if callbacks is None else list(callbacks)

    with _determinism(cfg.deterministic, device), _StopRequest() as stop:
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        objective.to(device)
        optimizer = build_optimizer(setup.param_groups if setup.param_groups is not None else model, setup.optim)
        steps_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
        scheduler = build_scheduler(optimizer, setup.schedule, steps_per_epoch, cfg.epochs)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        ema = _ema_of(model, cfg)
        t = Training(model, objective, optimizer, scheduler, scaler, setup, run, device, dtype, stop, callbacks, ema)
        _start(t)

        with _hooks(callbacks, t.state):
            for epoch in range(t.state.epoch, cfg.epochs):
                _begin_epoch(t, epoch, (train_loader, val_loader))
                lr, t0 = optimizer.param_groups[0]["lr"], time.perf_counter()
                out = train_one_epoch(t, train_loader, epoch)
                if out.stopped:
                    raise _interrupted(t, epoch + 1)
                val = _validate(t, t.model, val_loader, "val")
                ema_val = _validate(t, t.ema.module, val_loader, "val ema") if t.ema is not None else None
                scheduler.step_epoch(val.top1)
                record = _epoch_record(epoch, lr, out.record, val, ema_val, t0)
                on_ema = ema_val is not None and cfg.best_on == "ema"
                is_best = t.state.end_epoch(record, ema_val.top1 if on_ema else val.top1)  # type: ignore[union-attr]
                best = _checkpoint(t, weights="ema") if is_best and on_ema else None  # best.pt: the EMA weights
                run.save_epoch(_checkpoint(t), epoch + 1, is_best, cfg.keep_checkpoints, best=best)
                for cb in callbacks:
                    cb.on_epoch_end(epoch + 1, record)
                du.barrier()
                asked = du.all_reduce_max(torch.tensor([float(stop.asked)], device=device)).item() > 0
                if asked and epoch + 1 < cfg.epochs:  # a signal during validation or saving
                    raise _interrupted(t, epoch + 2)
    return FitResult(t.state.best_epoch, t.state.best_metric, t.state.history, run)


def log_settings(setup: FitSetup) -> LogSettings:
    """The loggers' settings: ``train.mlflow_uri``, ``experiment``, ``wandb_mode``; as parameters the resolved
    recipe (``setup.config``), with the ``train``, ``optim`` and ``schedule`` sections of ``setup``."""
    sections = {"train": to_dict(setup.train), "optim": to_dict(setup.optim), "schedule": to_dict(setup.schedule)}
    cfg = setup.train
    return LogSettings(cfg.mlflow_uri, cfg.experiment, cfg.wandb_mode, {**sections, **setup.config})


def _ema_of(model: nn.Module, cfg: TrainConfig) -> Any:
    """timm's ``ModelEmaV3`` of ``model`` (on its device) when ``train.ema_decay`` is set, else None."""
    if cfg.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)


def _validate(t: Training, model: nn.Module, loader: Any, label: str) -> EvalResult:
    cfg = t.setup.train
    return evaluate(
        model,
        loader,
        num_classes=len(t.setup.classes),
        device=t.device,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        progress=t.setup.progress,
        desc=f"{t.setup.desc} {label}",
    )


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def _start(t: Training) -> None:
    """Open the run folder: restore ``last.pt`` or save the untrained state (so a resume always has one),
    then compile and DDP-wrap the model."""
    ckpt = t.run.open(t.setup.classes, t.model)
    if ckpt is not None:
        du.unwrap(t.model).load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        t.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        t.state = FitState.from_checkpoint(ckpt)
        if t.ema is not None:
            _restore_ema(t, ckpt)
    else:
        t.run.save_last(_checkpoint(t))
    du.barrier()
    cfg = t.setup.train
    net: nn.Module = torch.compile(t.model) if cfg.compile else t.model
    t.model = du.wrap_ddp(net, t.device, find_unused_parameters=cfg.find_unused_parameters)


def _restore_ema(t: Training, ckpt: Mapping[str, Any]) -> None:
    """The EMA weights of ``ckpt``; a checkpoint of a run without EMA starts it from the restored model."""
    if "ema" in ckpt:
        t.ema.module.load_state_dict(ckpt["ema"])
    else:
        log.warning("%s has no EMA weights (train.ema_decay was off): the EMA starts from its model", t.run.last)
        t.ema.module.load_state_dict(du.unwrap(t.model).state_dict())


@contextlib.contextmanager
def _hooks(callbacks: Sequence[Callback], state: FitState) -> Iterator[None]:
    """``on_fit_start`` before the epochs, ``on_fit_end`` after them, also when training fails."""
    for cb in callbacks:
        cb.on_fit_start(state)
    try:
        yield
    except BaseException as exc:
        for cb in callbacks:
            cb.on_fit_end(state, exc)
        raise
    for cb in callbacks:
        cb.on_fit_end(state, None)


def _begin_epoch(t: Training, epoch: int, loaders: Sequence[Any]) -> None:
    """Reseed from ``(seed, epoch, rank)`` and tell the objective and the loaders the epoch."""
    seed_everything(epoch_seed(t.setup.seed, epoch, du.rank()))
    t.objective.set_epoch(epoch)
    for loader in loaders:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)


def _epoch_record(
    epoch: int, lr: float, train: Mapping[str, Any], val: EvalResult, ema: EvalResult | None, t0: float
) -> dict[str, Any]:
    """One row of metrics.csv (``val_ema_*``: the EMA weights' validation, when ``train.ema_decay`` is set)."""
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **train, "val_top1": val.top1, "val_top5": val.top5}
    record.update({f"val_{h}_top1": v for h, v in val.heads.items()})
    if ema is not None:
        record.update({"val_ema_top1": ema.top1, "val_ema_top5": ema.top5})
    record["seconds"] = time.perf_counter() - t0
    return record


def _checkpoint(t: Training, weights: str = "model") -> dict[str, Any]:
    """A training checkpoint (layout: ``engine.checkpoint``); ``weights="ema"``: the EMA weights as ``"model"``."""
    s = t.state
    ema = {"ema": t.ema.module.state_dict()} if t.ema is not None else {}
    return {
        "model": ema["ema"] if weights == "ema" else du.unwrap(t.model).state_dict(),
        **ema,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "epoch": s.epoch,
        "global_step": s.global_step,
        "best_metric": s.best_metric,
        "best_epoch": s.best_epoch,
        "history": list(s.history),
        "rng": rng_state(),
        "config": plain_data(t.setup.config, "config"),
        "classes": list(t.setup.classes),
        "metadata": plain_data(t.setup.metadata, "metadata"),
        "world_size": du.world_size(),
    }


def _interrupted(t: Training, in_epoch: int) -> TrainingInterrupted:
    """Write the interrupted record (rank 0) and build the exception to raise."""
    t.run.mark_interrupted(t.stop.name, in_epoch, t.state)
    return TrainingInterrupted(
        f"training stopped by {t.stop.name} during epoch {in_epoch}; {t.run.last} holds epoch "
        f"{t.state.epoch} (a partial epoch is replayed on resume). To resume: {t.run.hint}",
        checkpoint=t.run.last,
        epoch=t.state.epoch,
        signal_name=t.stop.name,
    )

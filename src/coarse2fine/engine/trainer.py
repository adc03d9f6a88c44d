"""The training loop: one flat loop for every model (after torchvision's reference ``train.py``).

Any model whose output follows the training contract (logits tensor, or dict with ``"logits"`` and
optional ``"heads"``) is trained with any ``Objective`` (named terms, total under ``"loss"``).

Checkpoints (rank 0 only, written atomically) in ``run_dir/checkpoints``:
``last.pt`` after every completed epoch (and once before the first, so a resume always has one),
``epoch_XXX.pt`` (the last ``keep_checkpoints``), ``best.pt`` (best validation top-1).

Faults:
- SIGINT/SIGTERM: the current step finishes, then training stops; ``last.pt`` is the last *completed*
  epoch (the partial epoch is dropped and replayed identically on resume), ``checkpoints/interrupted.json``
  records what happened, and ``TrainingInterrupted`` is raised with the resume hint. A second SIGINT
  stops at once (``KeyboardInterrupt``).
- Non-finite loss: ``nan_policy="stop"`` raises ``NonFiniteLossError`` naming epoch and step, leaving the
  checkpoints of the last good epoch untouched; ``"skip"`` drops that batch (counted in
  ``skipped_steps``).
- Resume: ``resume=True`` restores model, optimizer, scheduler, scaler, RNG, epoch and history from
  ``last.pt``. Every epoch reseeds torch/numpy/random from ``(seed, epoch, rank)``, so on the CPU in
  deterministic mode the resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from coarse2fine.config import OptimConfig, ScheduleConfig, TrainConfig
from coarse2fine.engine import distributed as du
from coarse2fine.engine.checkpoint import (
    atomic_copy,
    atomic_write_json,
    atomic_write_text,
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from coarse2fine.engine.evaluate import apply_threads, autocast, autocast_dtype, evaluate, resolve_device, to_device
from coarse2fine.engine.objective import Objective, logits_of
from coarse2fine.engine.optim import Scheduler, build_optimizer, build_scheduler
from coarse2fine.errors import C2FError, CheckpointError, ConfigError

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")


class TrainingInterrupted(C2FError):
    """SIGINT/SIGTERM stopped training after a clean checkpoint; the message says how to resume."""

    def __init__(self, message: str, *, checkpoint: Path, epoch: int, signal_name: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.signal_name = signal_name


class NonFiniteLossError(C2FError):
    """The loss became NaN or infinite (``nan_policy="stop"``)."""


@dataclass
class FitResult:
    best_epoch: int  # 1-based epoch with the best validation top-1 (0: none completed)
    best_val_top1: float
    history: list[dict[str, Any]]  # one record per completed epoch (the rows of metrics.csv)
    paths: dict[str, Path] = field(default_factory=dict)  # run_dir, last, best, metrics, tb

    @property
    def last_checkpoint(self) -> Path:
        return self.paths["last"]

    @property
    def best_checkpoint(self) -> Path:
        return self.paths["best"]


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
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


def _write_csv(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    columns: list[str] = []
    for rec in history:
        columns += [k for k in rec if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for rec in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in rec.items()})
    atomic_write_text(path, buf.getvalue())


class _TensorBoard:
    """Scalars to ``run_dir/tb`` on rank 0 (a no-op elsewhere or when tensorboard is missing)."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed: no TensorBoard logs")
                return
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class _State:
    """What a checkpoint restores besides module states."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    best_metric: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


# ---- one epoch -----------------------------------------------------------------------------------


@dataclass
class _EpochOut:
    record: dict[str, Any]
    stopped: bool = False


def train_one_epoch(
    model: nn.Module,
    objective: Objective,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    scaler: torch.amp.GradScaler,
    *,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    epoch: int,
    epochs: int,
    state: _State,
    stop: _StopRequest,
    tb: _TensorBoard,
    progress: bool,
    desc: str,
    ckpt_hint: str,
) -> _EpochOut:
    """Train ``epoch`` (0-based); returns the epoch's averaged terms, accuracy and throughput."""
    model.train()
    n_batches = len(loader)  # type: ignore[arg-type]
    accum = max(1, cfg.accumulate)
    multi = du.world_size() > 1
    params = [p for g in optimizer.param_groups for p in g["params"]]
    term_sums: dict[str, Tensor] = {}
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    skipped = 0
    in_window = 0  # batches backpropagated in the current accumulation window
    stopped = False
    start = time.perf_counter()
    bar = tqdm(
        loader,
        total=n_batches,
        desc=f"{desc} {epoch + 1}/{epochs}",
        disable=not progress or not du.is_main_process(),
        leave=False,
        dynamic_ncols=True,
    )
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(bar):
        images, targets = to_device(images, targets, device, cfg.channels_last)
        window_end = (i + 1) % accum == 0 or i + 1 == n_batches
        window_len = min(accum, n_batches - (i // accum) * accum)
        sync = contextlib.nullcontext() if (window_end or not multi) else model.no_sync()  # type: ignore[operator]
        with sync:
            with autocast(device, dtype):
                outputs = model(images)
                terms = objective(outputs, targets)
            loss = terms["loss"]
            bad = (~torch.isfinite(loss.detach())).float()
            flags = du.all_reduce_max(torch.stack([bad, torch.full_like(bad, float(stop.signum is not None))]))
            flags = flags.tolist()  # [any rank non-finite, any rank asked to stop]
            if flags[0] > 0:
                if cfg.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(loss.detach()):.4g}) at epoch {epoch + 1}, step {i + 1} of "
                        f"{n_batches} (global step {state.global_step}); {ckpt_hint} holds the last good "
                        f"epoch ({state.epoch}); lower optim.lr, set train.grad_clip or train.nan_policy=skip"
                    )
                skipped += 1
            else:
                scaler.scale(loss / window_len).backward()
                in_window += 1
                bs = targets.shape[0]
                seen += bs
                for k, v in terms.items():
                    v = v.detach().float()
                    if v.ndim == 0:
                        term_sums[k] = term_sums.get(k, torch.zeros((), device=device)) + v * bs
                correct += (logits_of(outputs).detach().argmax(1) == targets).sum()
        if window_end and in_window > 0:
            if multi and flags[0] > 0:
                _average_gradients(params)  # the skipped last batch did not trigger DDP's all-reduce
            if cfg.grad_clip is not None and cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step_update()
            state.global_step += 1
            in_window = 0
            if cfg.log_every > 0 and state.global_step % cfg.log_every == 0:
                tb.scalars(
                    {"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"]},
                    state.global_step,
                    "step",
                )
        elif window_end:
            optimizer.zero_grad(set_to_none=True)  # the whole window was skipped
            in_window = 0
        if bar.disable is False and (i % 10 == 0 or i + 1 == n_batches):
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(
                loss=f"{float(loss.detach()):.4f}",
                acc=f"{int(correct) / max(seen, 1):.3f}",
                img_s=f"{seen / elapsed:.0f}",
            )
        if flags[1] > 0 and i + 1 < n_batches:
            stopped = True  # a stop on the last batch lets the epoch complete (and be checkpointed)
            break
    bar.close()
    seconds = time.perf_counter() - start
    names = sorted(term_sums)
    packed = torch.stack(
        [
            *(term_sums[k] for k in names),
            correct.float(),
            torch.tensor(float(seen), device=device),
        ]
    ).double()
    packed = du.all_reduce_sum(packed).tolist()
    total_seen = packed[-1]
    record: dict[str, Any] = {}
    for k, s in zip(names, packed):
        record[f"train_{k}"] = s / total_seen if total_seen else float("nan")
    record["train_top1"] = packed[len(names)] / total_seen if total_seen else 0.0
    record["skipped_steps"] = skipped  # the same on every rank (the non-finite flag is all-reduced)
    record["train_seconds"] = seconds
    record["images_per_s"] = total_seen / seconds if seconds > 0 else 0.0
    return _EpochOut(record, stopped)


def _average_gradients(params: Sequence[Tensor]) -> None:
    size = du.world_size()
    for p in params:
        if p.grad is not None:
            du.all_reduce_sum(p.grad).div_(size)


# ---- fit -----------------------------------------------------------------------------------------


def _checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    scaler: torch.amp.GradScaler,
    state: _State,
    config_dict: Mapping[str, Any],
    classes: Sequence[str],
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "model": du.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "history": list(state.history),
        "rng": rng_state(),
        "config": _plain(config_dict, "config"),
        "classes": list(classes),
        "metadata": _plain(metadata or {}, "metadata"),
        "world_size": du.world_size(),
    }


def _validate(train_cfg: TrainConfig, train_loader: Any) -> None:
    if train_cfg.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"train.nan_policy: unknown value {train_cfg.nan_policy!r}; choose stop or skip")
    if train_cfg.accumulate < 1:
        raise ConfigError(f"train.accumulate: must be >= 1, got {train_cfg.accumulate}")
    if train_cfg.epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {train_cfg.epochs}")
    if len(train_loader) == 0:
        raise ConfigError("the training loader yields no batch: data.batch_size is larger than the training split")


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


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: Any,
    val_loader: Any,
    *,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    schedule_cfg: ScheduleConfig,
    run_dir: str | Path,
    config_dict: Mapping[str, Any],
    classes: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    resume: bool = False,
    param_groups: Iterable[Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    seed: int | None = None,
    overwrite: bool = False,
    resume_hint: str | None = None,
) -> FitResult:
    """Train ``model`` for ``train_cfg.epochs`` epochs; validate each epoch; checkpoint in ``run_dir``.

    ``param_groups``: optimizer groups (default: all of the model's parameters). ``seed``: default
    ``config_dict["seed"]`` or 0. ``overwrite``: allow a fresh run over an existing ``last.pt``.
    ``resume_hint``: the command that resumes this run (put in ``TrainingInterrupted``'s message).
    """
    _validate(train_cfg, train_loader)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    paths = {
        "run_dir": run_dir,
        "last": ckpt_dir / "last.pt",
        "best": ckpt_dir / "best.pt",
        "metrics": run_dir / "metrics.csv",
        "tb": run_dir / "tb",
        "interrupted": ckpt_dir / "interrupted.json",
    }
    main = du.is_main_process()
    rank = du.rank()
    seed = int(config_dict.get("seed", 0)) if seed is None else seed
    hint = resume_hint or f"run the same command again with resume enabled (fit(..., resume=True), run_dir={run_dir})"
    device = resolve_device(train_cfg.device)
    dtype = autocast_dtype(train_cfg.amp, device)
    apply_threads(train_cfg.threads)
    num_classes = len(classes)

    with _determinism(train_cfg.deterministic, device), _StopRequest() as stop:
        model.to(device)
        if train_cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        objective.to(device)
        optimizer = build_optimizer(param_groups if param_groups is not None else model, optim_cfg)
        steps_per_epoch = math.ceil(len(train_loader) / max(1, train_cfg.accumulate))
        scheduler = build_scheduler(optimizer, schedule_cfg, steps_per_epoch, train_cfg.epochs)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        state = _State()

        have_last = paths["last"].is_file()
        du.barrier()  # every rank decides before rank 0 writes anything
        if resume and have_last:
            ckpt = load_checkpoint(paths["last"])
            check_compatible(ckpt, classes, model, paths["last"])
            du.unwrap(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
            state = _State(
                ckpt["epoch"],
                ckpt["global_step"],
                ckpt["best_metric"],
                ckpt["best_epoch"],
                list(ckpt["history"]),
            )
            log.info("resumed from %s after epoch %d", paths["last"], state.epoch)
            if main and paths["interrupted"].exists():
                paths["interrupted"].unlink()
        else:
            if resume:
                log.warning("resume requested but %s does not exist: starting from scratch", paths["last"])
            elif have_last and not overwrite:
                raise CheckpointError(
                    f"{paths['last']} already exists: resume that run, or choose another run name / out_dir"
                )
            if main:
                save_checkpoint(
                    _checkpoint_state(model, optimizer, scheduler, scaler, state, config_dict, classes, metadata),
                    paths["last"],
                )
        du.barrier()

        net: nn.Module = torch.compile(model) if train_cfg.compile else model
        net = du.wrap_ddp(net, device, find_unused_parameters=train_cfg.find_unused_parameters)
        tb = _TensorBoard(paths["tb"], enabled=main, purge_step=state.global_step if resume else None)
        try:
            for epoch in range(state.epoch, train_cfg.epochs):
                seed_everything(epoch_seed(seed, epoch, rank))
                objective.set_epoch(epoch)
                for loader in (train_loader, val_loader):
                    if hasattr(loader, "set_epoch"):
                        loader.set_epoch(epoch)
                lr = optimizer.param_groups[0]["lr"]
                t0 = time.perf_counter()
                out = train_one_epoch(
                    net,
                    objective,
                    train_loader,
                    optimizer,
                    scheduler,
                    scaler,
                    cfg=train_cfg,
                    device=device,
                    dtype=dtype,
                    epoch=epoch,
                    epochs=train_cfg.epochs,
                    state=state,
                    stop=stop,
                    tb=tb,
                    progress=progress,
                    desc=desc,
                    ckpt_hint=str(paths["last"]),
                )
                if out.stopped:
                    raise _interrupted(stop, epoch + 1, state, paths, hint, main)
                val = evaluate(
                    net,
                    val_loader,
                    num_classes=num_classes,
                    device=device,
                    amp=train_cfg.amp,
                    channels_last=train_cfg.channels_last,
                    progress=progress,
                    desc=f"{desc} val",
                )
                scheduler.step_epoch(val.top1)
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    **out.record,
                    "val_top1": val.top1,
                    "val_top5": val.top5,
                }
                record.update({f"val_{h}_top1": v for h, v in val.heads.items()})
                record["seconds"] = time.perf_counter() - t0
                state.epoch = epoch + 1
                state.history.append(record)
                is_best = val.top1 > state.best_metric
                if is_best:
                    state.best_metric, state.best_epoch = val.top1, epoch + 1
                if main:
                    ckpt_state = _checkpoint_state(
                        net, optimizer, scheduler, scaler, state, config_dict, classes, metadata
                    )
                    save_checkpoint(ckpt_state, paths["last"])
                    atomic_copy(paths["last"], ckpt_dir / f"epoch_{epoch + 1:03d}.pt")
                    if is_best:
                        atomic_copy(paths["last"], paths["best"])
                    _prune(ckpt_dir, train_cfg.keep_checkpoints)
                    _write_csv(paths["metrics"], state.history)
                    tb.scalars(record, epoch + 1, "epoch")
                du.barrier()
                asked = du.all_reduce_max(torch.tensor([float(stop.signum is not None)], device=device))
                if asked.item() > 0 and epoch + 1 < train_cfg.epochs:  # signal during validation / saving
                    raise _interrupted(stop, epoch + 2, state, paths, hint, main)
        finally:
            tb.close()
    return FitResult(state.best_epoch, state.best_metric, state.history, paths)


def _interrupted(
    stop: _StopRequest, in_epoch: int, state: _State, paths: Mapping[str, Path], hint: str, main: bool
) -> TrainingInterrupted:
    """Write ``checkpoints/interrupted.json`` (rank 0) and build the exception to raise."""
    if main:
        atomic_write_json(
            paths["interrupted"],
            {
                "signal": stop.name,
                "interrupted_in_epoch": in_epoch,
                "last_completed_epoch": state.epoch,
                "global_step": state.global_step,
                "checkpoint": str(paths["last"]),
                "resume": hint,
            },
        )
    return TrainingInterrupted(
        f"training stopped by {stop.name} during epoch {in_epoch}; {paths['last']} holds epoch "
        f"{state.epoch} (a partial epoch is replayed on resume). To resume: {hint}",
        checkpoint=paths["last"],
        epoch=state.epoch,
        signal_name=stop.name,
    )


def _plain(value: Any, where: str) -> Any:
    """``value`` as weights_only-loadable plain data (numpy scalars/arrays become Python numbers/lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool, Tensor)):
        return value
    raise CheckpointError(f"checkpoint {where}: {type(value).__name__} is not plain data (JSON-like or tensors)")


def _prune(ckpt_dir: Path, keep: int) -> None:
    epochs = sorted(ckpt_dir.glob("epoch_*.pt"))
    for old in epochs[: max(0, len(epochs) - max(keep, 0))]:
        old.unlink(missing_ok=True)

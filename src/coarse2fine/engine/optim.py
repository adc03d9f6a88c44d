"""Optimizers and learning-rate schedules built from ``OptimConfig`` / ``ScheduleConfig``.

- ``plateau``: lr x ``plateau_factor`` (default /10) when validation top-1 stops improving for
  ``plateau_patience`` epochs, at most ``max_reductions`` times (METHODS.md §1, VGG recipe: 3 times).
- ``cosine``: linear warm-up then cosine decay to ``min_lr``, stepped per optimizer step.
- ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR`` (warm-up fraction = ``pct_start``).
- ``constant``: constant lr after the optional linear warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from coarse2fine.config import OptimConfig, ScheduleConfig, quote
from coarse2fine.errors import ConfigError


def _split_decay(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): biases and norm weights are the 1-D parameters (timm's convention)."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return decay, no_decay


def param_groups(params_or_groups: nn.Module | Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with ``weight_decay`` on weights and none on norm/bias (1-D) parameters.

    Accepts a module, an iterable of parameters, or a list of group dicts (their other keys, e.g. a
    per-group ``lr``, are kept; a group's own ``weight_decay`` overrides the default for its weights).
    """
    if isinstance(params_or_groups, nn.Module):
        items: list[Any] = [{"params": list(params_or_groups.parameters())}]
    else:
        items = list(params_or_groups)
        if items and not isinstance(items[0], dict):
            items = [{"params": items}]
    groups: list[dict[str, Any]] = []
    for group in items:
        params = [p for p in group["params"] if p.requires_grad]
        rest = {k: v for k, v in group.items() if k != "params"}
        wd = rest.pop("weight_decay", weight_decay)
        decay, no_decay = _split_decay(params)
        if decay:
            groups.append({**rest, "params": decay, "weight_decay": wd})
        if no_decay:
            groups.append({**rest, "params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ConfigError("optimizer: the model has no trainable parameters")
    return groups


def build_optimizer(params_or_groups: nn.Module | Iterable[Any], cfg: OptimConfig) -> Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; no weight decay on norm/bias parameters.

    ``cfg`` comes from a loaded recipe, whose values are checked there (``config.validate`` checks one built
    in Python).
    """
    groups = param_groups(params_or_groups, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise AssertionError(f"unreachable: optim.name={cfg.name!r} (checked when the config is loaded)")


class _WarmupCosine:
    """lr factor at optimizer step ``s``: linear warm-up over ``warmup`` steps, then cosine (or flat)."""

    def __init__(self, warmup: int, total: int, floor: float, cosine: bool) -> None:
        self.warmup, self.total, self.floor, self.cosine = warmup, total, floor, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Scheduler:
    """One interface over torch's schedulers: ``step_update()`` after every optimizer step,
    ``step_epoch(val_top1)`` after every validation. ``state_dict`` round-trips through checkpoints."""

    def __init__(self, scheduler: Any, per_step: bool, total_steps: int, max_reductions: int | None = None):
        self.scheduler = scheduler
        self.per_step = per_step
        self.total_steps = total_steps
        self.max_reductions = max_reductions
        self.steps = 0
        self.reductions = 0

    @property
    def optimizer(self) -> Optimizer:
        return self.scheduler.optimizer

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def step_update(self) -> None:
        if not self.per_step or self.steps >= self.total_steps:
            return  # OneCycleLR raises past its last step; the schedule is over anyway
        self.steps += 1
        self.scheduler.step()

    def step_epoch(self, metric: float | None = None) -> None:
        if self.per_step:
            return
        if isinstance(self.scheduler, ReduceLROnPlateau):
            if metric is None or (self.max_reductions is not None and self.reductions >= self.max_reductions):
                return
            before = self.get_last_lr()
            self.scheduler.step(metric)
            if any(a < b for a, b in zip(self.get_last_lr(), before)):
                self.reductions += 1
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "steps": self.steps, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the schedule's shape (warm-up, total steps) follows the current config, so a resumed run may
        # be given more epochs; only its progress (step count, last lr) comes from the checkpoint
        inner = dict(state["scheduler"])
        if isinstance(self.scheduler, LambdaLR) and "lr_lambdas" in inner:
            inner["lr_lambdas"] = [None] * len(inner["lr_lambdas"])
        if isinstance(self.scheduler, OneCycleLR):
            for key in ("total_steps", "_schedule_phases"):
                inner.pop(key, None)
        self.scheduler.load_state_dict(inner)
        self.steps = int(state["steps"])
        self.reductions = int(state["reductions"])


def warmup_steps_of(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    if cfg.warmup_steps is not None:
        return max(0, int(cfg.warmup_steps))
    return max(0, round(cfg.warmup_epochs * steps_per_epoch))


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> Scheduler:
    """The lr schedule named by ``cfg.name``; ``steps_per_epoch`` counts optimizer steps."""
    total = max(1, steps_per_epoch * epochs)
    warmup = warmup_steps_of(cfg, steps_per_epoch)
    name = cfg.name
    if name == "plateau":
        sched = ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
        return Scheduler(sched, per_step=False, total_steps=total, max_reductions=cfg.max_reductions)
    if name in ("cosine", "constant"):
        lambdas = [
            _WarmupCosine(warmup, total, min(1.0, cfg.min_lr / g["lr"]) if g["lr"] > 0 else 0.0, name == "cosine")
            for g in optimizer.param_groups
        ]
        return Scheduler(LambdaLR(optimizer, lambdas), per_step=True, total_steps=total)
    if name == "onecycle":
        pct = warmup / total if warmup > 0 else 0.3
        if not 0.0 < pct < 1.0:
            raise ConfigError(
                f"schedule: warm-up of {quote(warmup)} steps leaves no room in {total} total steps "
                "(--set schedule.warmup_epochs=... or schedule.warmup_steps=... below that)"
            )
        cycle_momentum = "momentum" in optimizer.defaults and optimizer.defaults.get("momentum", 0) > 0
        cycle_momentum = cycle_momentum or "betas" in optimizer.defaults
        sched = OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=pct,
            cycle_momentum=cycle_momentum,
        )
        return Scheduler(sched, per_step=True, total_steps=total)
    raise AssertionError(f"unreachable: schedule.name={cfg.name!r} (checked when the config is loaded)")

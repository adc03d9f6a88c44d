"""One run end to end: build from the config, train, pick ``best`` on validation, evaluate on test.

Used by ``c2f train``, ``make demo``, the benchmarks and HD-CNN's building-block stage. Everything is
built and checked (settings, data, model, loss, optimizer, schedule, the run folder's start / resume /
refuse decision) before the first file is written; ``check_run`` (``c2f train --check``) stops there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from coarse2fine.config import RunConfig, to_dict
from coarse2fine.engine import EvalResult, FitSetup, Objective, RunFolder, evaluate, fit, save_eval_artifacts
from coarse2fine.engine import distributed as du
from coarse2fine.engine.checkpoint import atomic_write_json, atomic_write_text
from coarse2fine.engine.evaluate import apply_threads
from coarse2fine.engine.run_folder import RunChecked
from coarse2fine.errors import ConfigError
from coarse2fine.facts import RunFacts
from coarse2fine.recipes.data import SPLIT_CSV, DataBundle, Loaders, build_datasets, build_loaders
from coarse2fine.recipes.models import build_model_and_objective
from coarse2fine.recipes.trained import load_trained


@dataclass
class RunReport:
    run_dir: Path
    classes: list[str]
    best_epoch: int
    best_val_top1: float
    test: EvalResult | None
    train_seconds: float
    history: list[dict[str, Any]]
    skipped_images: list[str]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "best_epoch": self.best_epoch,
            "best_val_top1": self.best_val_top1,
            "train_seconds": self.train_seconds,
        }
        if self.test is not None:
            out.update(test_top1=self.test.top1, test_top5=self.test.top5, test_heads=self.test.heads)
        return out


def _skipped(*datasets: Any) -> list[str]:
    """Unreadable images skipped (``bad_images: skip``), each path once (views share their base's record)."""
    paths = [str(p) for ds in datasets for p in (getattr(ds, "skipped", None) or {})]
    return list(dict.fromkeys(paths))


def save_resolved_config(cfg: RunConfig, run_dir: Path) -> Path:
    """``run_dir/config.yaml``: the recipe with every default and override filled in."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclass
class _Built:
    """What a run builds before ``fit`` opens its folder (nothing written yet)."""

    bundle: DataBundle
    loaders: Loaders
    facts: RunFacts
    model: nn.Module
    objective: Objective
    run: RunFolder
    setup: FitSetup


def _build(
    cfg: RunConfig, *, resume: bool, overwrite: bool, progress: bool, resume_hint: str | None, dry_run: bool
) -> _Built:
    if cfg.method == "hdcnn":
        raise ConfigError("method: an HD-CNN is trained in stages by `c2f hdcnn fit --config <the same recipe>`")
    apply_threads(cfg.train.threads)
    info = du.init_distributed(device=cfg.train.device)
    bundle = build_datasets(cfg, run_dir=cfg.run_dir if resume else None, progress=progress and du.is_main_process())
    loaders = build_loaders(cfg, bundle, rank=info.rank, world_size=info.world_size)
    facts = bundle.facts()
    model, objective = build_model_and_objective(cfg, facts)
    # config.yaml (and the data split) are written by RunFolder.open once the run is accepted: a refused run
    # keeps the old ones
    files = {SPLIT_CSV: bundle.split.to_csv()} if bundle.split is not None else {}
    run = RunFolder(
        cfg.run_dir,
        resume=resume,
        overwrite=overwrite,
        resume_hint=resume_hint,
        config=to_dict(cfg),
        files=files,
        dry_run=dry_run,
    )
    setup = FitSetup.from_run_config(cfg, bundle.classes, facts.to_dict(), progress=progress)
    return _Built(bundle, loaders, facts, model, objective, run, setup)


@dataclass
class RunCheck:
    """What ``check_run`` accepted: the run folder's decision, the data and the model."""

    run_dir: Path
    decision: str  # "start", "resume after epoch 3", "start afresh, replacing the previous run"
    classes: int
    images: dict[str, int]  # train / val / test
    model: str
    parameters: int


def check_run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> RunCheck:
    """``c2f train --check``: build and check everything ``train_run`` would (data, model, loss, optimizer,
    schedule, the checkpoint to resume), then stop before anything is written."""
    b = _build(cfg, resume=resume, overwrite=overwrite, progress=False, resume_hint=None, dry_run=True)
    try:
        fit(b.model, b.objective, b.loaders.train, b.loaders.val, b.setup, b.run)
    except RunChecked as outcome:
        sizes = {name: len(getattr(b.bundle, name)) for name in ("train", "val", "test")}
        params = sum(p.numel() for p in b.model.parameters())
        return RunCheck(Path(cfg.run_dir), outcome.decision, len(b.bundle.classes), sizes, cfg.model.name, params)
    raise AssertionError("fit returned without opening the run folder")  # pragma: no cover


def train_run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    evaluate_test: bool = True,
    resume_hint: str | None = None,
) -> RunReport:
    """Train ``cfg`` (on every process of a torchrun launch) and evaluate ``best`` on the test split."""
    b = _build(cfg, resume=resume, overwrite=overwrite, progress=progress, resume_hint=resume_hint, dry_run=False)
    bundle, loaders, run_dir = b.bundle, b.loaders, cfg.run_dir
    result = fit(b.model, b.objective, loaders.train, loaders.val, b.setup, b.run)
    test_result = None
    if evaluate_test:
        best = load_trained(result.best_checkpoint, classes=bundle.classes)
        test_result = evaluate(
            best.model,
            loaders.test,
            num_classes=len(bundle.classes),
            device=cfg.train.device if cfg.train.device != "auto" else None,
            amp=cfg.train.amp,
            channels_last=cfg.train.channels_last,
            progress=progress and du.is_main_process(),
            desc="test",
        )
        if du.is_main_process():
            save_eval_artifacts(test_result, run_dir, bundle.classes, prefix="test")
    train_seconds = float(sum(r.get("seconds", 0.0) for r in result.history))
    report = RunReport(
        run_dir=Path(run_dir),
        classes=bundle.classes,
        best_epoch=result.best_epoch,
        best_val_top1=result.best_val_top1,
        test=test_result,
        train_seconds=train_seconds,
        history=result.history,
        skipped_images=_skipped(bundle.train, bundle.val, bundle.test),
    )
    if du.is_main_process():
        atomic_write_json(Path(run_dir) / "report.json", report.summary())
    return report

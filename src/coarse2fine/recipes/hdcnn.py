"""HD-CNN staged training (METHODS.md §2.1, §2.3), every stage checkpointed, then its test report.

Stages, each under ``runs/<name>/`` and skipped when its output exists (``resume=True``):

1. ``block.pt`` — the building block, trained with ``engine.fit`` in ``block/`` (best epoch on the
   validation split), or reused from ``hdcnn.block_checkpoint``;
2. ``hierarchy.json`` + ``hierarchy.png`` — learnt from the block's softmax on the held-out
   validation split (the test split never chooses anything);
3. ``fine/component_<k>.pt`` — each fine component F_k pretrained on the images whose label is in
   S_k (local labels), shared layers frozen, one after another (``fine/k<k>/``);
4. ``hdcnn_init.pt`` (assembled, before fine-tuning) and ``hdcnn.pt`` — global fine-tuning with the
   consistency loss in ``finetune/`` (lr ``hdcnn.finetune_lr`` or ``optim.lr / 10``);
5. ``hdcnn_report.json`` + ``beta_tradeoff.png`` — evaluation on the test split (recomputed each run).

``config.yaml`` (the resolved recipe) is written once the data was read, the block built and a block
checkpoint to reuse accepted: a refused run creates no folder and leaves an existing one as it was.

An interrupted stage resumes from its ``checkpoints/last.pt``. Stage outputs are written atomically,
so a crash never leaves a half-written one that a later run would skip to. Each stage output records
the settings it was made with (``recipes.hdcnn_records``); a re-run whose settings differ for a stage it
would reuse is a ConfigError naming them (``--restart`` retrains every stage).

Under ``torchrun`` stages 1, 3 and 4 train data-parallel (``data.batch_size`` is the global batch),
every rank computes the same hierarchy from the gathered held-out softmax, rank 0 alone writes the
stage files and evaluates stage 5 on the whole test split; the other ranks return ``{"rank": r}``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from coarse2fine.config import RunConfig, to_dict
from coarse2fine.data import LocalLabelView, class_counts
from coarse2fine.engine import distributed as du
from coarse2fine.engine.checkpoint import atomic_write_json, check_compatible, load_checkpoint, save_checkpoint
from coarse2fine.engine.evaluate import apply_threads, predict_proba
from coarse2fine.engine.objective import CrossEntropyObjective
from coarse2fine.engine.run_folder import RunFolder
from coarse2fine.engine.trainer import FitSetup, fit
from coarse2fine.errors import ConfigError, HierarchyError
from coarse2fine.facts import HDCNNFacts, RunFacts
from coarse2fine.hdcnn import HDCNN, HDCNNObjective, plot_tradeoff, split_block
from coarse2fine.hierarchy import Hierarchy, coarse_targets
from coarse2fine.recipes.data import DataBundle, Loaders, build_datasets, build_loaders, save_split
from coarse2fine.recipes.hdcnn_records import (
    STAGE_SETTINGS,
    block_record,
    check_block_split,
    check_stage_reuse,
    final_record,
    fine_record,
    hierarchy_record,
    init_record,
)
from coarse2fine.recipes.hdcnn_report import evaluate_hdcnn, reference_taxonomy
from coarse2fine.recipes.hierarchy import learn_from_probs, write_hierarchy
from coarse2fine.recipes.models import build_backbone, build_hdcnn_model
from coarse2fine.recipes.train import save_resolved_config

log = logging.getLogger(__name__)

STAGE_RESUME_HINT = "run the same command again (c2f hdcnn fit resumes unfinished stages)"


# ---- paths --------------------------------------------------------------------------------------


class StagePaths:
    """Where every stage's output lives under the run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.block = self.run_dir / "block.pt"
        self.hierarchy = self.run_dir / "hierarchy.json"
        self.hierarchy_png = self.run_dir / "hierarchy.png"
        self.init = self.run_dir / "hdcnn_init.pt"
        self.final = self.run_dir / "hdcnn.pt"
        self.report = self.run_dir / "hdcnn_report.json"
        self.tradeoff_png = self.run_dir / "beta_tradeoff.png"

    def fine(self, k: int) -> Path:
        return self.run_dir / "fine" / f"component_{k}.pt"


# ---- model construction -------------------------------------------------------------------------


def hdcnn_facts(cfg: RunConfig, h: Hierarchy, t: Sequence[float], data: RunFacts) -> RunFacts:
    """The data's facts plus what rebuilds the HD-CNN and its loss (hierarchy, branch point, t_k)."""
    return data.replace(
        hdcnn=HDCNNFacts(
            hierarchy=h.to_dict(),
            branch_stage=cfg.hdcnn.branch_stage,
            block=cfg.model.name,
            coarse_targets=[float(v) for v in t],
        )
    )


def hdcnn_param_groups(model: HDCNN) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on weights only, also for the stacked fine components.

    The engine's default puts 1-D parameters (norm weights, biases) in the no-decay group; a stacked
    fine component's biases are 2-D ``(K, n)``, so they are grouped by their per-component rank here.
    """
    stacked, _ = model.fine.stacked()
    rank = {id(getattr(model.fine, name.replace(".", "__"))): p.dim() - 1 for name, p in stacked.items()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if rank.get(id(p), p.dim()) > 1 else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- data helpers --------------------------------------------------------------------------------


def _local_bundle(bundle: DataBundle, members: Sequence[int]) -> DataBundle:
    train, val = LocalLabelView(bundle.train, members), LocalLabelView(bundle.val, members)
    return dataclasses.replace(bundle, train=train, val=val, test=val, classes=list(train.classes))


# ---- stages ----------------------------------------------------------------------------------------


def _stage_cfg(cfg: RunConfig, *, epochs: int, lr: float | None = None) -> RunConfig:
    train = dataclasses.replace(cfg.train, epochs=epochs)
    optim = dataclasses.replace(cfg.optim, lr=cfg.optim.lr if lr is None else lr)
    return dataclasses.replace(cfg, train=train, optim=optim)


def _fit_stage(
    cfg: RunConfig,
    model: nn.Module,
    objective: Any,
    loaders: Any,
    run_dir: Path,
    facts: RunFacts,
    *,
    resume: bool,
    progress: bool,
    desc: str,
    param_groups: Any = None,
) -> dict[str, Any]:
    """``engine.fit`` one stage, then load its best (validation) weights; returns the best checkpoint.

    ``resume``: continue from the stage's ``checkpoints/last.pt`` when there is one; otherwise (a
    restart) an old run of the stage is overwritten.
    """
    started = RunFolder(run_dir).started
    run = RunFolder(run_dir, resume=resume and started, overwrite=not resume, resume_hint=STAGE_RESUME_HINT)
    setup = FitSetup.from_run_config(
        cfg, facts.classes, facts.to_dict(), param_groups=param_groups, desc=desc, progress=progress
    )
    result = fit(model, objective, loaders.train, loaders.val, setup, run)
    best = result.best_checkpoint if result.best_checkpoint.is_file() else result.last_checkpoint
    ckpt = load_checkpoint(best)
    model.load_state_dict(ckpt["model"])
    return ckpt


def _final_checkpoint(model: nn.Module, cfg: RunConfig, facts: RunFacts, **extra: Any) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "config": to_dict(cfg),
        "classes": list(facts.classes),
        "metadata": facts.to_dict(),
        **extra,
    }


def _save_on_main(state: dict[str, Any], path: Path) -> None:
    """Rank 0 writes ``path``; under torchrun every rank waits until it is there."""
    if du.is_main_process():
        save_checkpoint(state, path)
    du.barrier()


def _check_block(cfg: RunConfig, bundle: DataBundle, paths: StagePaths, *, resume: bool) -> None:
    """What the stages will refuse, checked before anything is written: the block must build and have
    ``hdcnn.branch_stage``; a block checkpoint it would reuse must fit the classes, the architecture and
    the split; every finished stage file a resumed run would reuse must match this run's settings."""
    block = build_backbone(cfg, len(bundle.classes), bundle.num_channels)
    split_block(block, cfg.hdcnn.branch_stage)
    source = cfg.hdcnn.block_checkpoint or (str(paths.block) if resume and paths.block.is_file() else None)
    if source is not None:
        ckpt = load_checkpoint(source)
        check_compatible(ckpt, list(bundle.classes), block, source)
        if cfg.hdcnn.block_checkpoint:
            check_block_split(cfg, ckpt.get("config"), source)
    if not resume:
        return
    stage_files = [] if cfg.hdcnn.block_checkpoint else [(paths.block, block_record)]
    stage_files += [(paths.hierarchy, hierarchy_record)]  # in pipeline order: the first stage that differs is named
    num_coarse = Hierarchy.load(paths.hierarchy).num_coarse if paths.hierarchy.is_file() else cfg.hdcnn.num_coarse
    stage_files += [(paths.fine(k), fine_record) for k in range(num_coarse)]
    stage_files += [(paths.init, init_record), (paths.final, final_record)]
    for path, record in stage_files:
        if path.is_file():
            stored = Hierarchy.load(path).meta if path == paths.hierarchy else load_checkpoint(path)
            check_stage_reuse(path, stored.get(STAGE_SETTINGS), record(cfg), warn=False)


def stage_block(
    cfg: RunConfig, bundle: DataBundle, loaders: Loaders, paths: StagePaths, *, resume: bool, progress: bool
) -> tuple[nn.Module, str]:
    """Stage 1: the trained building block (weights loaded) and where it came from."""
    classes = list(bundle.classes)
    block = build_backbone(cfg, len(classes), bundle.num_channels, image_size=bundle.image_size)
    split_block(block, cfg.hdcnn.branch_stage)  # a wrong branch stage fails before any training
    source = cfg.hdcnn.block_checkpoint or (str(paths.block) if resume and paths.block.is_file() else None)
    if source is not None:
        ckpt = load_checkpoint(source)
        check_compatible(ckpt, classes, block, source)
        if cfg.hdcnn.block_checkpoint:  # the hierarchy must come from images the block never trained on
            check_block_split(cfg, ckpt.get("config"), source)
        else:
            check_stage_reuse(source, ckpt.get(STAGE_SETTINGS), block_record(cfg))
        block.load_state_dict(ckpt["model"])
        log.info("HD-CNN stage 1: building block from %s", source)
        return block, source
    epochs = cfg.hdcnn.block_epochs or cfg.train.epochs
    bcfg = dataclasses.replace(_stage_cfg(cfg, epochs=epochs), method="plain")
    facts = bundle.facts().replace(stage="block")
    ckpt = _fit_stage(
        bcfg,
        block,
        CrossEntropyObjective(cfg.train.label_smoothing),
        loaders,
        paths.run_dir / "block",
        facts,
        resume=resume,
        progress=progress,
        desc="block",
    )
    record = {STAGE_SETTINGS: block_record(cfg)}
    _save_on_main(_final_checkpoint(block, bcfg, facts, epoch=ckpt.get("epoch"), **record), paths.block)
    return block, str(paths.block)


def stage_hierarchy(
    cfg: RunConfig,
    block: nn.Module,
    bundle: DataBundle,
    loaders: Loaders,
    paths: StagePaths,
    *,
    resume: bool,
    progress: bool,
) -> Hierarchy:
    """Stage 2: the hierarchy from the block's held-out (validation) probabilities (METHODS.md §2.1)."""
    classes = list(bundle.classes)
    if resume and paths.hierarchy.is_file():
        h = Hierarchy.load(paths.hierarchy, classes)
        check_stage_reuse(paths.hierarchy, h.meta.get(STAGE_SETTINGS), hierarchy_record(cfg))
    else:
        probs, targets = predict_proba(
            block,
            loaders.val,
            device=cfg.train.device,
            amp=cfg.train.amp,
            progress=progress and du.is_main_process(),
            desc="held-out probabilities",
        )
        h = learn_from_probs(probs, targets, classes, cfg.hdcnn, seed=cfg.seed)
        h = dataclasses.replace(h, meta={**h.meta, STAGE_SETTINGS: hierarchy_record(cfg)})
        if du.is_main_process():  # every rank holds the same gathered probabilities, hence the same h
            title = f"{cfg.name}: learnt hierarchy (K={h.num_coarse})"
            write_hierarchy(h, probs, targets, paths.run_dir, reference=reference_taxonomy(cfg, bundle), title=title)
        du.barrier()
    if h.num_coarse > len(classes):
        raise HierarchyError(f"K={h.num_coarse} coarse categories exceeds the {len(classes)} classes")
    return h


def stage_fine_components(
    cfg: RunConfig,
    model: HDCNN,
    bundle: DataBundle,
    paths: StagePaths,
    facts: RunFacts,
    *,
    resume: bool,
    progress: bool,
) -> None:
    """Stage 3: pretrain each F_k alone on its partial set, shared layers frozen (METHODS.md §2.3).

    A one-class partial set has no F_k (p_k = 1 on its class): nothing to learn, nothing written."""
    lr = cfg.hdcnn.fine_lr if cfg.hdcnn.fine_lr is not None else cfg.optim.lr
    fcfg = _stage_cfg(cfg, epochs=cfg.hdcnn.fine_epochs, lr=lr)
    record = fine_record(cfg)
    for k in model.runnable:
        members = model.partial_sets[k]
        out = paths.fine(k)
        net = model.fine_component_net(k)
        if resume and out.is_file():
            ckpt = load_checkpoint(out)
            check_stage_reuse(out, ckpt.get(STAGE_SETTINGS), record)
            net.component.load_state_dict(ckpt["model"])
        elif cfg.hdcnn.fine_epochs > 0:
            local = _local_bundle(bundle, members)
            loaders = build_loaders(fcfg, local, rank=du.rank(), world_size=du.world_size())
            local_facts = facts.replace(classes=local.classes, stage="fine", component=k, partial_set=list(members))
            _fit_stage(
                fcfg,
                net,
                CrossEntropyObjective(cfg.train.label_smoothing),
                loaders,
                paths.run_dir / "fine" / f"k{k}",
                local_facts,
                resume=resume,
                progress=progress,
                desc=f"fine component {k + 1}/{model.num_coarse}",
            )
            _save_on_main(_final_checkpoint(net.component, fcfg, local_facts, **{STAGE_SETTINGS: record}), out)
        model.load_fine_component(k, net)


def stage_finetune(
    cfg: RunConfig,
    model: HDCNN,
    bundle: DataBundle,
    loaders: Loaders,
    paths: StagePaths,
    facts: RunFacts,
    t: np.ndarray,
    *,
    resume: bool,
    progress: bool,
) -> None:
    """Stage 4: global fine-tuning with the consistency term (METHODS.md §2.3)."""
    classes = list(bundle.classes)
    if resume and paths.final.is_file():
        ckpt = load_checkpoint(paths.final)
        check_stage_reuse(paths.final, ckpt.get(STAGE_SETTINGS), final_record(cfg))
        state = model.convert_state_dict(ckpt["model"])  # an earlier layout: one-class slots dropped
        check_compatible({**ckpt, "model": state}, classes, model, paths.final)
        model.load_state_dict(state)
        return
    lr = cfg.hdcnn.finetune_lr if cfg.hdcnn.finetune_lr is not None else cfg.optim.lr / 10
    tcfg = _stage_cfg(cfg, epochs=cfg.hdcnn.finetune_epochs, lr=lr)
    if cfg.hdcnn.finetune_epochs > 0:
        objective = HDCNNObjective(t, cfg.hdcnn.consistency_weight)
        _fit_stage(
            tcfg,
            model,
            objective,
            loaders,
            paths.run_dir / "finetune",
            facts,
            resume=resume,
            progress=progress,
            desc="fine-tune",
            param_groups=hdcnn_param_groups(model),
        )
    _save_on_main(_final_checkpoint(model, tcfg, facts, **{STAGE_SETTINGS: final_record(cfg)}), paths.final)


# ---- the whole pipeline -----------------------------------------------------------------------------


@dataclasses.dataclass
class Pretrained:
    """What stages 1-3 (METHODS.md §2.3) produce: the block, the hierarchy and the pretrained HD-CNN."""

    block: nn.Module
    block_source: str
    hierarchy: Hierarchy
    coarse_targets: np.ndarray
    facts: RunFacts
    model: HDCNN


def pretrain_stages(
    cfg: RunConfig, bundle: Any, loaders: Any, paths: StagePaths, *, resume: bool = True, progress: bool = True
) -> Pretrained:
    """Stages 1-3: building block, hierarchy on the held-out split, fine components (shared layers frozen)."""
    classes = list(bundle.classes)
    block, block_source = stage_block(cfg, bundle, loaders, paths, resume=resume, progress=progress)
    h = stage_hierarchy(cfg, block, bundle, loaders, paths, resume=resume, progress=progress)
    t = coarse_targets(h.partial_sets, class_counts(bundle.train, len(classes)), cfg.hdcnn.coarse_targets)
    facts = hdcnn_facts(cfg, h, t, bundle.facts())
    torch.manual_seed(cfg.seed)
    model = HDCNN(
        block,
        h.partial_sets,
        cfg.hdcnn.branch_stage,
        class_names=classes,
        fine_exec=cfg.hdcnn.fine_exec,
        fine_head_init=cfg.hdcnn.fine_head_init,
    )
    stage_fine_components(cfg, model, bundle, paths, facts, resume=resume, progress=progress)
    return Pretrained(block, block_source, h, t, facts, model)


def stage_init(cfg: RunConfig, pre: Pretrained, paths: StagePaths, *, resume: bool) -> HDCNN:
    """``hdcnn_init.pt``: the assembled HD-CNN before fine-tuning (written, or reused), loaded into a new model."""
    if resume and paths.init.is_file():
        check_stage_reuse(paths.init, load_checkpoint(paths.init).get(STAGE_SETTINGS), init_record(cfg))
    elif du.is_main_process():
        save_checkpoint(_final_checkpoint(pre.model, cfg, pre.facts, **{STAGE_SETTINGS: init_record(cfg)}), paths.init)
    du.barrier()
    initial = build_hdcnn_model(cfg, pre.facts)
    initial.load_state_dict(load_checkpoint(paths.init)["model"])
    return initial


def run_pipeline(cfg: RunConfig, *, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train (stages 1-4, resumable) and evaluate an HD-CNN; returns (and saves) the report."""
    cfg = dataclasses.replace(cfg, method="hdcnn")
    apply_threads(cfg.train.threads)
    start = time.perf_counter()
    paths = StagePaths(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    bundle = build_datasets(cfg, run_dir=cfg.run_dir if resume else None, progress=progress)
    if cfg.hdcnn.num_coarse > len(bundle.classes):
        raise ConfigError(
            f"hdcnn.num_coarse={cfg.hdcnn.num_coarse} exceeds the {len(bundle.classes)} classes "
            f"(--set hdcnn.num_coarse={len(bundle.classes)} or fewer)"
        )
    info = du.init_distributed(device=cfg.train.device)  # under torchrun: data-parallel stages
    loaders = build_loaders(cfg, bundle, rank=info.rank, world_size=info.world_size)
    classes = list(bundle.classes)
    _check_block(cfg, bundle, paths, resume=resume)  # before the first write: run folder, config.yaml
    if du.is_main_process():
        save_resolved_config(cfg, paths.run_dir)
        save_split(bundle, paths.run_dir)

    pre = pretrain_stages(cfg, bundle, loaders, paths, resume=resume, progress=progress)
    h, model = pre.hierarchy, pre.model
    initial = stage_init(cfg, pre, paths, resume=resume)
    stage_finetune(cfg, model, bundle, loaders, paths, pre.facts, pre.coarse_targets, resume=resume, progress=progress)
    if info.world_size > 1:  # trained: rank 0 evaluates on the whole test split alone
        du.cleanup()
        if info.rank != 0:
            return {"name": cfg.name, "rank": info.rank, "checkpoint": str(paths.final)}
        loaders = build_loaders(cfg, bundle)

    reference = reference_taxonomy(cfg, bundle)
    model.beta = cfg.hdcnn.beta
    report = evaluate_hdcnn(
        cfg,
        model,
        h,
        loaders.test,
        block=pre.block,
        initial=initial,
        reference=reference,
        betas=cfg.hdcnn.beta_sweep,
        progress=progress,
    )
    report.update(
        name=cfg.name,
        classes=classes,
        groups=h.groups(),
        partial_sets=h.partial_groups(),
        coarse_names=h.coarse_names,
        coarse_targets=[float(v) for v in pre.coarse_targets],
        block_source=pre.block_source,
        checkpoint=str(paths.final),
        pipeline_seconds=time.perf_counter() - start,
    )
    plot_tradeoff(report["beta_sweep"], paths.tradeoff_png, title=f"{cfg.name}: conditional execution")
    atomic_write_json(paths.report, report)
    return report

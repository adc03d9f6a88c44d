"""Model and loss of a run, built from a resolved :class:`RunConfig` and the run's :class:`RunFacts`.

Methods (``cfg.method``) are a table of builders, so the engine never branches on them: ``plain``
(a factory model + cross-entropy), ``herbs`` (the plug-in around the factory model) and ``hdcnn``
(the hierarchy recorded in the facts, wrapped around the building block).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from coarse2fine.config import RunConfig
from coarse2fine.engine import CrossEntropyObjective, Objective, load_checkpoint
from coarse2fine.engine.checkpoint import model_state_of
from coarse2fine.errors import CheckpointError, HierarchyError, ModelError
from coarse2fine.facts import RunFacts
from coarse2fine.hdcnn import HDCNN, HDCNNObjective
from coarse2fine.herbs import build_herbs
from coarse2fine.hierarchy import Hierarchy
from coarse2fine.models import create_model, init_from_shallower, load_pretrained_file


def build_backbone(
    cfg: RunConfig, num_classes: int, in_chans: int, *, image_size: int | None = None, load_files: bool = True
) -> nn.Module:
    """The factory model of ``cfg.model`` for ``image_size`` inputs (the run's resolved size, recorded in its
    facts; default ``data.image_size``), with its local weights (``pretrained_file``) when asked.

    The initial weights come from ``cfg.seed`` (torch's global generator is seeded first: a fresh
    process starts it from a random seed, so the same recipe would otherwise start differently).
    ``load_files=False`` (rebuilding a trained checkpoint) reads no weights: neither the hub nor files.
    """
    torch.manual_seed(cfg.seed)
    m = cfg.model
    kwargs = dict(m.kwargs)
    if m.init is not None:
        kwargs["init"] = m.init
    size = image_size or cfg.data.image_size
    if size and not m.name.startswith("timm/"):
        kwargs.setdefault("input_size", size)  # our heads are sized to the training input
    if load_files and m.pretrained:
        kwargs["pretrained"] = m.pretrained
    else:
        kwargs.pop("pretrained", None)
    model = create_model(m.name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if load_files and m.pretrained_file:
        try:
            load_pretrained_file(model, m.pretrained_file)
        except ModelError as exc:
            raise ModelError(f"model.pretrained_file for model {m.name!r}: {exc}") from exc
    if load_files and m.init_from:
        ckpt = load_checkpoint(m.init_from)
        init_from_shallower(model, model_state_of(ckpt, m.init_from))
    return model


def build_hdcnn_model(cfg: RunConfig, facts: RunFacts, *, load_files: bool = False) -> HDCNN:
    """An untrained HD-CNN with the architecture recorded in ``facts.hdcnn`` (METHODS.md §2.2)."""
    if facts.hdcnn is None:
        raise CheckpointError("HD-CNN checkpoint metadata has no hierarchy: not written by c2f hdcnn fit")
    h = Hierarchy.from_dict(facts.hdcnn.hierarchy, source="checkpoint metadata")
    if facts.classes:
        h.validate(facts.classes)
    if facts.hdcnn.block != cfg.model.name:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=facts.hdcnn.block))
    block = build_backbone(cfg, h.num_classes, facts.in_chans, image_size=facts.image_size, load_files=load_files)
    return HDCNN(
        block,
        h.partial_sets,
        facts.hdcnn.branch_stage,
        class_names=h.class_names,
        beta=cfg.hdcnn.beta,
        fine_exec=cfg.hdcnn.fine_exec,
    )


def _plain(cfg: RunConfig, facts: RunFacts, load_files: bool) -> tuple[nn.Module, Objective]:
    model = build_backbone(cfg, len(facts.classes), facts.in_chans, image_size=facts.image_size, load_files=load_files)
    return model, CrossEntropyObjective(cfg.train.label_smoothing)


def _herbs(cfg: RunConfig, facts: RunFacts, load_files: bool) -> tuple[nn.Module, Objective]:
    size = facts.image_size
    backbone = build_backbone(cfg, len(facts.classes), facts.in_chans, image_size=size, load_files=load_files)
    return build_herbs(backbone, len(facts.classes), cfg.herbs, (facts.in_chans, size, size))


def _hdcnn(cfg: RunConfig, facts: RunFacts, load_files: bool) -> tuple[nn.Module, Objective]:
    model = build_hdcnn_model(cfg, facts)
    if len(facts.classes) not in (0, model.num_classes):
        raise HierarchyError(f"the hierarchy has {model.num_classes} classes but the data has {len(facts.classes)}")
    return model, HDCNNObjective(coarse_targets_of(facts, model.partial_sets), cfg.hdcnn.consistency_weight)


def coarse_targets_of(facts: RunFacts, partial_sets: Sequence[Sequence[int]]) -> np.ndarray:
    """The t_k recorded with the model, or (older checkpoints) proportional to the partial sets' sizes."""
    if facts.hdcnn is not None and facts.hdcnn.coarse_targets is not None:
        return np.asarray(facts.hdcnn.coarse_targets, dtype=np.float64)
    sizes = np.array([len(s) for s in partial_sets], dtype=np.float64)
    return sizes / sizes.sum()


Builder = Callable[[RunConfig, RunFacts, bool], tuple[nn.Module, Objective]]
METHODS: dict[str, Builder] = {"plain": _plain, "herbs": _herbs, "hdcnn": _hdcnn}


def build_model_and_objective(
    cfg: RunConfig, facts: RunFacts, *, load_files: bool = True
) -> tuple[nn.Module, Objective]:
    """Model and loss of ``cfg.method`` for data described by ``facts`` (classes, channels, size)."""
    return METHODS[cfg.method](cfg, facts, load_files)

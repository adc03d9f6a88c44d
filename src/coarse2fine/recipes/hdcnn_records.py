"""What each HD-CNN stage file was made with, so that a re-run reuses a finished stage only for the
same settings (``recipes.hdcnn``), and the check that a reused building block saw the same split.

A stage's *record* is a flat mapping ``{setting as --set spells it: value}`` of the settings that change
what the stage writes, its own and those of the stages before it:

- ``block.pt``: the model, the data (name, root, val_fraction, limit_train, image_size, label), the seed,
  the training recipe (batch size and augmentation, ``optim.*``, ``schedule.*``, label smoothing,
  accumulation, gradient clipping) and the block's epochs (``hdcnn.block_epochs``, or ``train.epochs``
  when that is null); with ``hdcnn.block_checkpoint``, that file instead of the training recipe;
- ``hierarchy.json`` (``meta.stage_settings``): + ``hdcnn.num_coarse``, ``clustering``, ``gamma``,
  ``max_partial_size``;
- ``fine/component_<k>.pt``: + ``hdcnn.branch_stage``, ``fine_epochs``, ``fine_lr``, ``fine_head_init`` and
  the training recipe;
- ``hdcnn_init.pt``: + ``hdcnn.coarse_targets``; ``hdcnn.pt``: + ``hdcnn.finetune_epochs``,
  ``finetune_lr``, ``consistency_weight``.

Settings that do not change a stage's output are in no record: where and how fast it runs (device,
threads, amp, channels_last, compile, workers, progress), evaluation (``eval.*``, ``hdcnn.beta``,
``beta_sweep``, ``reference_hierarchy``, test scale and limit) and ``hdcnn.fine_exec`` (same result).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coarse2fine.config import RunConfig, to_dict
from coarse2fine.errors import ConfigError

log = logging.getLogger(__name__)

STAGE_SETTINGS = "stage_settings"  # the record's key in a stage checkpoint and in hierarchy.json's meta

# the data a block is trained on and the held-out split the hierarchy is learnt on (stratified, seeded)
SPLIT_KEYS = ("data.name", "data.root", "data.val_fraction", "data.limit_train", "seed")
BLOCK_KEYS = ("model", *SPLIT_KEYS, "data.image_size", "data.label")
TRAINING_KEYS = (
    "data.batch_size",
    "data.pad",
    "data.flip",
    "data.color_shift",
    "data.train_scale",
    "optim",
    "schedule",
    "train.label_smoothing",
    "train.accumulate",
    "train.grad_clip",
)
HIERARCHY_KEYS = ("hdcnn.num_coarse", "hdcnn.clustering", "hdcnn.gamma", "hdcnn.max_partial_size")
FINE_KEYS = ("hdcnn.branch_stage", "hdcnn.fine_epochs", "hdcnn.fine_lr", "hdcnn.fine_head_init", *TRAINING_KEYS)
FINETUNE_KEYS = ("hdcnn.finetune_epochs", "hdcnn.finetune_lr", "hdcnn.consistency_weight")

RESTART_HINT = (
    "retrain every stage with `c2f hdcnn fit --restart`, or keep that run and train this configuration "
    "under another name: `--set name=<new name>`"
)


def _root(value: Any) -> Any:
    return str(Path(value).expanduser().resolve()) if isinstance(value, str) else value


def _values(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``{dotted key: value}`` of a config dict (``to_dict``); a section name stands for all its keys."""
    defaults = to_dict(RunConfig())
    out: dict[str, Any] = {}
    for key in keys:
        *section, name = key.split(".")
        node: Any = config.get(section[0], {}) if section else config
        default: Any = defaults.get(section[0], {}) if section else defaults
        value = node.get(name, default.get(name)) if isinstance(node, Mapping) else default.get(name)
        if isinstance(default.get(name), dict) and not section:  # a whole section: "optim", "model"
            value = value if isinstance(value, Mapping) else {}
            out.update({f"{name}.{k}": value.get(k, v) for k, v in default[name].items()})
        else:
            out[key] = _root(value) if key == "data.root" else value
    return out


def block_record(cfg: RunConfig) -> dict[str, Any]:
    """What the building block of ``cfg`` is made from (or the checkpoint it is taken from)."""
    config = to_dict(cfg)
    record = _values(config, BLOCK_KEYS)
    if cfg.hdcnn.block_checkpoint:
        return {"hdcnn.block_checkpoint": _root(cfg.hdcnn.block_checkpoint), **record}
    # the block's epochs: hdcnn.block_epochs, or train.epochs when that is null
    epochs = {"hdcnn.block_epochs": cfg.hdcnn.block_epochs or cfg.train.epochs}
    return {"hdcnn.block_checkpoint": None, **record, **_values(config, TRAINING_KEYS), **epochs}


def hierarchy_record(cfg: RunConfig) -> dict[str, Any]:
    return {**block_record(cfg), **_values(to_dict(cfg), HIERARCHY_KEYS)}


def fine_record(cfg: RunConfig) -> dict[str, Any]:
    return {**hierarchy_record(cfg), **_values(to_dict(cfg), FINE_KEYS)}


def init_record(cfg: RunConfig) -> dict[str, Any]:
    return {**fine_record(cfg), **_values(to_dict(cfg), ("hdcnn.coarse_targets",))}


def final_record(cfg: RunConfig) -> dict[str, Any]:
    return {**init_record(cfg), **_values(to_dict(cfg), FINETUNE_KEYS)}


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: <saved> there, <current> now`` for every key of both whose values differ."""
    return [f"{k} = {saved[k]!r} there, {v!r} now" for k, v in current.items() if k in saved and saved[k] != v]


def check_stage_reuse(path: str | Path, saved: Any, current: Mapping[str, Any], *, warn: bool = True) -> None:
    """Reusing the finished stage file ``path`` (recorded settings ``saved``) for settings ``current``.

    Differences are a ConfigError naming each setting with both values and the remedy; a file written
    before stages recorded their settings (``saved`` None) is reused with a warning.
    """
    if not isinstance(saved, Mapping):
        if not warn:
            return
        log.warning(
            "HD-CNN: reusing %s, written before stage files recorded their settings: it cannot be checked "
            "against this run's (c2f hdcnn fit --restart retrains every stage)",
            path,
        )
        return
    diff = _differences(saved, current)
    if diff:
        raise ConfigError(
            f"HD-CNN stage file {str(path)!r} was made with other settings than this run: {'; '.join(diff)}. "
            f"A re-run reuses finished stages, so its results would be reported as this configuration's; "
            f"{RESTART_HINT}"
        )


def check_block_split(cfg: RunConfig, saved: Any, source: str) -> None:
    """A reused building block (``hdcnn.block_checkpoint``) must have been trained on this run's split.

    ``saved``: the checkpoint's stored config. The hierarchy is learnt on this run's held-out split; a
    block trained on another split may have trained on those very images. A ConfigError naming the
    differing settings, or a warning with ``hdcnn.allow_other_split: true``.
    """
    allow = "set hdcnn.allow_other_split: true to use it anyway"
    if not isinstance(saved, Mapping):
        diff = ["it records no config, so the split it was trained on cannot be checked"]
    else:
        diff = _differences(_values(saved, SPLIT_KEYS), _values(to_dict(cfg), SPLIT_KEYS))
    if not diff:
        return
    what = f"building block {source!r} was trained on another split than this run: {'; '.join(diff)}"
    risk = "the hierarchy is learnt on this run's held-out split, which may hold images the block was trained on"
    if cfg.hdcnn.allow_other_split:
        log.warning("%s (%s; hdcnn.allow_other_split is true)", what, risk)
        return
    raise ConfigError(
        f"{what}. {risk[0].upper()}{risk[1:]}; train the block in this run (drop hdcnn.block_checkpoint), "
        f"use the same data settings and seed, or {allow}"
    )

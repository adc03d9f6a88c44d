"""``load_trained``: the one way to rebuild a model from any checkpoint this toolkit writes (plain,
HERBS, HD-CNN, product-quantised) or from its safetensors export (``recipes.exported``), with what is
needed to feed it images."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from coarse2fine.compress import apply_compression_structure
from coarse2fine.config import RunConfig, config_from_dict, with_overrides
from coarse2fine.engine import check_compatible, load_checkpoint
from coarse2fine.engine.checkpoint import model_state_of
from coarse2fine.engine.evaluate import apply_threads
from coarse2fine.errors import CheckpointError, ConfigError
from coarse2fine.facts import RunFacts
from coarse2fine.recipes.data import SPLIT_CSV, transforms_for
from coarse2fine.recipes.exported import is_export, read_export
from coarse2fine.recipes.models import build_model_and_objective

# Options added after checkpoints were written: the value that rebuilds those checkpoints' models, used
# when a stored config lacks the key (a newer default would change the architecture).
PRE_OPTION_VALUES: dict[tuple[str, str], Any] = {("herbs", "bottom_up_proj"): False}


@dataclass
class Trained:
    """A model rebuilt from a checkpoint, in eval mode, with what is needed to feed it images."""

    model: nn.Module
    cfg: RunConfig
    facts: RunFacts
    checkpoint: dict[str, Any]
    path: Path

    @property
    def classes(self) -> list[str]:
        return self.facts.classes

    @property
    def run_dir(self) -> Path | None:
        """The run folder whose ``split.csv`` fixes the test split: the checkpoint's (or its parent's), else
        the config's ``out_dir/name``; None when none has one."""
        for folder in (self.path.parent, self.path.parent.parent, self.cfg.run_dir):
            if (folder / SPLIT_CSV).is_file():
                return folder
        return None

    def eval_transform(self, *, on_device: bool = True) -> Any:
        """The eval transform the model was validated with (statistics stored in the checkpoint);
        ``on_device=False``: the CPU pipeline even for a run that decoded on the GPU (``data.decode_device``)."""
        f = self.facts
        cfg = self.cfg
        if not on_device:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decode_device="cpu"))
        return transforms_for(cfg, f.data_stats, f.image_size, f.in_memory)[1]


def stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored config with the options it predates set to their old behaviour."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, key), value in PRE_OPTION_VALUES.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section][key] = value
    return data


def read_facts(ckpt: dict[str, Any], path: str | Path) -> RunFacts:
    """The checkpoint's typed facts, its class list filled in from ``checkpoint["classes"]``."""
    facts = RunFacts.from_dict(ckpt.get("metadata") or {}, source=f"checkpoint {str(path)!r}")
    saved = [str(c) for c in ckpt["classes"]]
    return facts.replace(classes=saved) if facts.classes != saved else facts


def load_trained(
    path: str | Path, *, classes: list[str] | None = None, overrides: list[str] | None = None
) -> Trained:
    """Rebuild the model of a training (or ``c2f compress``-ed) checkpoint and load its weights (``weights_only``).

    ``path`` may also be a safetensors export (``c2f export --format safetensors``): its folder or its
    ``.safetensors`` file; ``Trained.checkpoint`` is then the export as a checkpoint-like dict.
    ``classes``: when given, the checkpoint's class list must equal it (CheckpointError otherwise).
    ``overrides``: ``section.key=value`` settings applied to the stored config (e.g. ``data.root=...``).
    """
    path = Path(path)
    ckpt = read_export(path) if is_export(path) else load_checkpoint(path)
    for key in ("config", "classes", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {key!r}: not a coarse2fine training checkpoint")
    try:
        stored = config_from_dict(stored_config(ckpt["config"]))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: stored config is invalid: {exc}") from exc
    cfg = with_overrides(stored, overrides or [])  # a bad override is the caller's ConfigError
    apply_threads(cfg.train.threads)
    facts = read_facts(ckpt, path)
    model, _ = build_model_and_objective(cfg, facts, load_files=False)
    if facts.compression:  # a product-quantised model: rebuild its quantised layers before loading
        apply_compression_structure(model, facts.compression)
    state = model_state_of(ckpt, path)
    convert = getattr(model, "convert_state_dict", None)  # HD-CNN: checkpoints of its earlier stacking
    state = convert(state) if callable(convert) else state
    check_compatible({**ckpt, "model": state}, classes, model, path)
    model.load_state_dict(state)
    model.eval()
    return Trained(model=model, cfg=cfg, facts=facts, checkpoint=ckpt, path=path)

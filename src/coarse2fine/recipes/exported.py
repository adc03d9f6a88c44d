"""The safetensors export format: a model's weights without the training state, and what rebuilds it.

An export is two files side by side (``c2f export --format safetensors``)::

    <folder>/model.safetensors   the model's state dict (a product-quantised layer as its uint8 codes
                                 and fp32 centres, as in the checkpoint)
    <folder>/config.json         {"format": "coarse2fine.export", "version": 1,
                                  "weights": "model.safetensors", "weights_sha256": ...,
                                  "model", "method", "classes", "input", "normalisation", "preprocessing",
                                  "hierarchy" (HD-CNN), "compression" (spec of a compressed model),
                                  "facts" (RunFacts), "config" (the run's resolved recipe)}

``facts`` and ``config`` are what :func:`coarse2fine.recipes.load_trained` reads (the same as a training
checkpoint's ``metadata`` and ``config``); the other keys describe the model for other runtimes.
:func:`read_export` turns an export back into a checkpoint-like dict, so every verb that takes a
checkpoint takes an export folder or its ``.safetensors`` file too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from coarse2fine.config import RunConfig
from coarse2fine.data import eval_scale
from coarse2fine.errors import CheckpointError
from coarse2fine.facts import RunFacts
from coarse2fine.recipes.outputs import write_atomically

EXPORT_FORMAT = "coarse2fine.export"
EXPORT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def is_export(path: str | Path) -> bool:
    """A folder (an export folder) or a ``.safetensors`` file: read with :func:`read_export`."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors"


def export_files(out: str | Path) -> tuple[Path, Path]:
    """(weights, config.json) of an export at ``out``: a folder, or the ``.safetensors`` file itself."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return out, out.with_name(CONFIG_NAME)
    return out / WEIGHTS_NAME, out / CONFIG_NAME


def preprocessing(cfg: RunConfig, facts: RunFacts) -> dict[str, Any]:
    """How an image becomes the model's input (the eval transform the model was validated with)."""
    size = facts.image_size
    colour = "L" if facts.in_chans == 1 else "RGB"
    last = "pixels / 255, then (x - mean) / std per channel"
    if facts.in_memory:
        steps = f"{colour} image resized (bilinear, antialiased) to {size}x{size} if it has another size; {last}"
        return {"colour": colour, "resize": size, "crop": size, "steps": steps}
    q = eval_scale(cfg.data.train_scale, cfg.data.test_scale, size)
    steps = f"{colour} image, shortest side resized to {q} (bilinear, antialiased), centre crop {size}x{size}; {last}"
    return {"colour": colour, "resize_shortest_side": q, "crop": size, "steps": steps}


def describe(cfg: RunConfig, facts: RunFacts) -> dict[str, Any]:
    """The model in plain terms: what other runtimes need to feed it and read its output."""
    hdcnn = facts.hdcnn
    return {
        "model": hdcnn.block if hdcnn is not None else cfg.model.name,
        "method": cfg.method,
        "classes": list(facts.classes),
        "input": {"layout": "NCHW", "channels": facts.in_chans, "height": facts.image_size, "width": facts.image_size},
        "normalisation": {"mean": facts.mean, "std": facts.std},
        "preprocessing": preprocessing(cfg, facts),
        "hierarchy": hdcnn.hierarchy if hdcnn is not None else None,
        "compression": facts.compression,
    }


def _state_tensors(state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint's 'model' is not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"the model state holds values that are not tensors (e.g. {bad[:3]}): not for safetensors"
        )
    # own contiguous copies: safetensors refuses tensors that share memory
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def write_export(
    state: dict[str, Any], cfg_dict: dict[str, Any], cfg: RunConfig, facts: RunFacts, out: str | Path
) -> tuple[Path, Path]:
    """Write ``state`` (a model state dict) and its ``config.json`` at ``out`` (see the module docstring).

    The weights are written first and the config last, each atomically; the config names the weights
    file and its SHA-256, so a config never describes other weights than the ones beside it.
    """
    weights, config = export_files(out)
    if config.is_file():
        try:
            other = json.loads(config.read_text()).get("weights")
        except (OSError, ValueError, AttributeError):
            other = None
        if other not in (None, weights.name):
            raise CheckpointError(
                f"{config} already describes the export {other!r}; write {weights.name!r} to another folder"
            )
    blob = save_safetensors(_state_tensors(state), metadata={"format": "pt", "coarse2fine": EXPORT_FORMAT})
    info = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "weights": weights.name,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        **describe(cfg, facts),
        "facts": facts.to_dict(),
        "config": cfg_dict,
    }
    try:
        text = json.dumps(info, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's settings hold a non-finite number ({exc}); cannot write JSON") from exc
    write_atomically(weights, lambda f: f.write(blob))
    write_atomically(config, lambda f: f.write(text.encode("utf-8")))
    return weights, config


def _read_config(config: Path, where: str) -> dict[str, Any]:
    if not config.is_file():
        raise CheckpointError(
            f"{where}: no {CONFIG_NAME} beside the weights (an export of c2f export --format safetensors "
            f"is a folder with {WEIGHTS_NAME} and {CONFIG_NAME})"
        )
    try:
        info = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{config}: unreadable or not JSON ({exc})") from exc
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f'{config}: not a coarse2fine export config (no "format": "{EXPORT_FORMAT}")')
    if info.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{config}: export version {info.get('version')!r}; this version reads {EXPORT_VERSION}")
    for key in ("weights", "facts", "config", "classes"):
        if key not in info:
            raise CheckpointError(f"{config}: has no {key!r}")
    return info


def read_export(path: str | Path) -> dict[str, Any]:
    """An export folder (or its ``.safetensors`` file) as a checkpoint-like dict:
    ``{"model", "config", "classes", "metadata", "export"}``; CheckpointError naming what is wrong."""
    path = Path(path)
    where = f"export {str(path)!r}"
    if not path.exists():
        raise CheckpointError(f"{where} does not exist")
    weights, config = export_files(path)
    info = _read_config(config, where)
    if path.is_dir():
        weights = path / str(info["weights"])
    elif info["weights"] != weights.name:
        raise CheckpointError(f"{config} describes {info['weights']!r}, not {weights.name!r}")
    if not weights.is_file():
        raise CheckpointError(f"{where}: the weights file {str(weights)!r} is missing")
    blob = weights.read_bytes()
    if info.get("weights_sha256") not in (None, hashlib.sha256(blob).hexdigest()):
        raise CheckpointError(f"{weights}: its SHA-256 differs from the one in {config} (changed or truncated)")
    try:
        state = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    return {
        "model": state,
        "config": info["config"],
        "classes": list(info["classes"]),
        "metadata": info["facts"],
        "export": {k: v for k, v in info.items() if k not in ("facts", "config")},
    }

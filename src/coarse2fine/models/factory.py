"""Model factory: names -> Backbones, summaries (params, FLOPs) and local weight files."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from coarse2fine.config import clip, quote
from coarse2fine.errors import ModelError
from coarse2fine.models.base import Backbone
from coarse2fine.models.nin import NIN
from coarse2fine.models.pretrained import load_vgg_pretrained
from coarse2fine.models.timm_backbone import PREFIX, create_timm
from coarse2fine.models.vgg import VGG_MODELS

_REGISTRY: dict[str, Callable[..., Backbone]] = {**VGG_MODELS, "nin": NIN}


def register_model(name: str, builder: Callable[..., Backbone], *, replace: bool = False) -> None:
    """Make ``builder(num_classes=..., in_chans=..., **kwargs) -> Backbone`` available as ``model.name``."""
    if name.startswith(PREFIX):
        raise ModelError(f"model name {name!r}: the prefix {PREFIX!r} is reserved for timm models")
    if name in _REGISTRY and not replace:
        raise ModelError(f"model {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = builder


def unregister_model(name: str) -> None:
    """Remove a model added with :func:`register_model`."""
    _REGISTRY.pop(name, None)


def list_models() -> list[str]:
    """Our model names; any timm model is also available as ``timm/<name>``."""
    return sorted(_REGISTRY)


def create_model(
    name: str, num_classes: int = 1000, in_chans: int = 3, pretrained: bool | str = False, **kwargs: Any
) -> Backbone:
    """Build model ``name`` (``vgg16``, ``vgg_small_bn``, ``nin``, ``timm/resnet18``, ...).

    ``kwargs`` go to the constructor (VGG/NIN: ``input_size``, ``init``, ``dropout``, ...; timm:
    e.g. ``img_size``). ``init=None`` keeps the model's default. ``pretrained``: ``model.pretrained``
    (``models.pretrained``: timm's weights through the Hugging Face hub cache; our VGG A/B/D/E map timm's).
    """
    if kwargs.get("init", "x") is None:
        kwargs.pop("init")
    if name.startswith(PREFIX):
        kwargs.pop("init", None)
        kwargs["pretrained"] = pretrained
        return create_timm(name[len(PREFIX):], num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"valid: {', '.join(list_models())}"
        raise ModelError(f"unknown model {name!r}; {hint} (or timm/<name> for any timm model)")
    try:
        model = _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ModelError(f"model {quote(name)}: bad keyword argument(s) {clip(str(sorted(kwargs)))}: {exc}") from exc
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as exc:
        if isinstance(exc, ModelError):
            raise
        # a keyword value the layers refuse (a negative width, a size torch cannot allocate, ...)
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {name!r} cannot be built with {_shown(kwargs)}: {reason}") from exc
    if pretrained:
        load_vgg_pretrained(model, name, pretrained)  # type: ignore[arg-type]
    return model


def _shown(kwargs: Mapping[str, Any]) -> str:
    return clip(", ".join(f"{k}={quote(v, 60)}" for k, v in kwargs.items()))


def default_input_size(name: str, in_chans: int = 3, **kwargs: Any) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` input model ``name`` is built for with ``kwargs`` (ours: ``input_size``, default the
    model's; timm: ``img_size`` or the pretrained config's), read from a copy on the meta device (no memory).
    None for a registered model without ``default_input_size``."""
    with torch.device("meta"):
        model = create_model(name, num_classes=2, in_chans=in_chans, **kwargs)
    size = getattr(model, "default_input_size", None)
    return tuple(int(v) for v in size) if size is not None else None  # type: ignore[return-value]


def model_summary(
    name: str, num_classes: int = 1000, in_chans: int = 3, input_size: tuple[int, int] | int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Parameters and forward FLOPs (FlopCounterMode, 2 per multiply-add) of one image.

    Built on the meta device, so even VGG-19 costs no memory. ``input_size`` (H, W) also sizes
    the head of our models; default: the model's own input size.
    """
    if input_size is not None and not name.startswith(PREFIX):
        kwargs.setdefault("input_size", input_size)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs).eval()
    c, h, w = model.default_input_size
    if input_size is not None:
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, c, h, w, device="meta"))
    return {"params": model.num_parameters(), "flops": int(counter.get_total_flops()), "input_size": (c, h, w)}


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or unsafe file
        raise ModelError(f"weights file {str(path)!r} cannot be read safely: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelError(f"weights file {str(path)!r} holds no state dict of tensors")
    return dict(obj)


def load_pretrained_file(
    model: nn.Module, path: str | Path, strict: bool = True, skip_head: bool | None = None
) -> dict[str, list[str]]:
    """Load local weights (safetensors or a torch state dict / checkpoint) into ``model``.

    Keys may carry a ``module.`` (DDP) prefix; timm files without our ``model.`` prefix are accepted.
    ``skip_head=None`` skips the classifier when its class count differs (``True`` always, ``False``
    never). Any other shape mismatch, and with ``strict`` any missing or unexpected key, raises a
    ModelError naming the keys and the file. Returns ``loaded``, ``skipped``, ``missing``, ``unexpected``.
    """
    path = Path(path)
    sd = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    target = model.state_dict()
    if not set(sd) & set(target) and all(k.startswith("model.") for k in target):
        sd = {f"model.{k}": v for k, v in sd.items()}
    head = getattr(model, "classifier_name", None)
    head_keys = {k for k in target if head and k.startswith(head + ".")}
    head_differs = any(k in sd and sd[k].shape != target[k].shape for k in head_keys)
    skipped = sorted(head_keys & set(sd)) if (skip_head or (skip_head is None and head_differs)) else []
    bad = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(target[k].shape)})"
        for k in sd
        if k in target and k not in skipped and sd[k].shape != target[k].shape
    ]
    missing = sorted(set(target) - set(sd) - (head_keys if skipped else set()))
    unexpected = sorted(set(sd) - set(target))
    if bad:
        raise ModelError(f"weights file {str(path)!r}: shape mismatch for {', '.join(bad)}")
    if strict and (missing or unexpected):
        raise ModelError(
            f"weights file {str(path)!r} does not match the model: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} (strict=False loads the common keys)"
        )
    loaded = [k for k in sd if k in target and k not in skipped]
    model.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "skipped": skipped, "missing": missing, "unexpected": unexpected}

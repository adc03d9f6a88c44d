"""Pretrained weights through timm and the Hugging Face hub client: their cache, ``HF_HOME``, ``HF_HUB_OFFLINE``.

``model.pretrained`` (``bool | str``) names the weights:

- ``true``: the timm model's default pretrained weights (its ``pretrained_cfg``, e.g. ``timm/resnet18.a1_in1k``);
- ``"<name>.<tag>"`` or ``"<tag>"``: another of timm's pretrained tags of the same architecture;
- ``"hf-hub:<owner>/<repo>[@revision]"`` (or ``"<owner>/<repo>"``): a timm model repository on the hub, whose
  ``config.json`` must name the same architecture.

timm builds the model with ``pretrained=True, num_classes=..., in_chans=...``: the classifier is re-created when
the class count differs from the weights', and the first convolution is adapted to other channel counts. Our VGG
configurations A, B, D and E (plain or ``_bn``) take timm's torchvision VGG weights (``vgg16.tv_in1k``) through
a key mapping (:func:`coarse2fine.models.vgg.vgg_state_from_timm`).

Files already in the hub cache are read from there. A miss that cannot be downloaded (``HF_HUB_OFFLINE=1``, no
network), a repository that does not exist, and weights of another architecture are ModelErrors that say
what to download and where.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from coarse2fine.errors import ModelError
from coarse2fine.models.vgg import VGG, vgg_state_from_timm

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
# our VGG configurations with ImageNet weights in timm (torchvision's, ``<name>.tv_in1k``): same names
TIMM_VGG = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")


def _repo_of(hub_id: str) -> tuple[str, str | None]:
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def download_hint(hub_id: str) -> str:
    """What to run where, for weights ``hub_id`` that are not in the hub cache."""
    from huggingface_hub import constants

    repo, revision = _repo_of(hub_id)
    command = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "")
    why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
    return (
        f"the pretrained weights {hub_id!r} are not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
        f"cannot be downloaded ({why}). Download them on a machine with network (`{command}`, or "
        f"`hf download {repo}`) into that cache (HF_HOME={constants.HF_HOME}; the files go to "
        f"HF_HOME/hub/models--{repo.replace('/', '--')}) and copy it here, or unset HF_HUB_OFFLINE so they are "
        "downloaded, or give local weights with model.pretrained_file"
    )


@contextlib.contextmanager
def hub_errors(hub_id: str) -> Iterator[None]:
    """Hub and download failures while fetching ``hub_id`` as ModelErrors that say what to do."""
    from huggingface_hub import errors

    try:
        yield
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise ModelError(
            f"pretrained weights {hub_id!r}: the Hugging Face hub has no such repository or revision "
            f"({type(exc).__name__}); check the id (timm's are timm/<model>.<tag>, see timm.list_pretrained())"
        ) from exc
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
        raise ModelError(download_hint(hub_id)) from exc
    except errors.EntryNotFoundError as exc:
        what = f"pretrained weights {hub_id!r}: the hub repository has no weights file timm reads"
        raise ModelError(f"{what}: {exc}") from exc
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ModelError(f"pretrained weights {hub_id!r} could not be downloaded: {exc}") from exc


def _no_weights(arch: str, name: str) -> ModelError:
    import timm

    tags = timm.list_pretrained(f"{arch}.*")
    known = f"its pretrained tags: {', '.join(tags)}" if tags else "timm has no pretrained weights for it"
    return ModelError(f"model.pretrained: timm has no pretrained weights {name!r} ({known})")


def _hub_weights(arch: str, repo: str) -> tuple[str, str]:
    """``hf-hub:<repo>`` after checking that its config names architecture ``arch``."""
    from timm.models import load_model_config_from_hf

    with hub_errors(repo):
        _, architecture, _ = load_model_config_from_hf(repo)
    if architecture != arch:
        raise ModelError(
            f"model.pretrained: hub repository {repo!r} holds weights of timm architecture {architecture!r}, "
            f"not {arch!r}; set model.name: timm/{architecture}, or choose weights of {arch}"
        )
    return HUB_PREFIX + repo, repo


def timm_weights(name: str, pretrained: bool | str) -> tuple[str, str]:
    """(the name ``timm.create_model`` gets, the weights' hub id or URL) for timm model ``name`` (an
    architecture, optionally with a tag) and ``model.pretrained``."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, own_tag = split_model_name_tag(name)
    if isinstance(pretrained, str):
        spec = pretrained.strip()
        if spec.startswith(HUB_PREFIX) or "/" in spec:
            return _hub_weights(arch, spec.removeprefix(HUB_PREFIX))
        base, tag = split_model_name_tag(spec) if "." in spec else (arch, spec)
        if base != arch:
            raise ModelError(
                f"model.pretrained {spec!r} are weights of timm architecture {base!r}, but the model is {arch!r}; "
                f"use a tag of {arch} (timm.list_pretrained('{arch}.*')) or set model.name: timm/{base}"
            )
        name = f"{arch}.{tag}"
    elif own_tag:
        name = f"{arch}.{own_tag}"
    if not timm.is_model(arch):
        raise ModelError(f"unknown timm model {arch!r}")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown tag
        raise _no_weights(arch, name) from exc
    source = (cfg.hf_hub_id or cfg.url) if cfg is not None else None
    if not source:
        raise _no_weights(arch, name)
    return name, source


def create_pretrained_timm(name: str, pretrained: bool | str, **kwargs: Any) -> Any:
    """``timm.create_model`` with the weights ``pretrained`` names (head and input channels adapted by timm)."""
    import timm

    timm_name, source = timm_weights(name, pretrained)
    log.info("timm model %s: pretrained weights %s", name, source)
    with hub_errors(source):
        try:
            return timm.create_model(timm_name, pretrained=True, **kwargs)
        except RuntimeError as exc:  # load_state_dict: the weights do not fit
            raise ModelError(f"pretrained weights {source!r} do not fit timm model {name!r}: {exc}") from exc


def load_vgg_pretrained(model: VGG, name: str, pretrained: bool | str) -> dict[str, list[str]]:
    """Our VGG ``name`` with timm's (torchvision's) ImageNet weights of the same configuration."""
    if name not in TIMM_VGG or not isinstance(model, VGG):
        raise ModelError(
            f"model {name!r} has no pretrained weights: our {', '.join(TIMM_VGG)} take timm's ImageNet VGG weights; "
            f"otherwise use a timm model (model.name: timm/<name>, e.g. timm/vgg16) or model.pretrained_file"
        )
    source = create_pretrained_timm(name, pretrained)
    state, report = vgg_state_from_timm(model, source.state_dict())
    model.load_state_dict(state, strict=False)
    if report["skipped"]:
        log.warning("VGG %s: pretrained layers not loaded (shapes differ): %s", name, ", ".join(report["skipped"]))
    return report


def pretrained_normalization(name: str, pretrained: bool | str) -> tuple[list[float], list[float]] | None:
    """The per-channel (mean, std) in [0, 1] that the weights ``pretrained`` of model ``name`` (ours or
    ``timm/<name>``) were trained with, from their timm ``pretrained_cfg`` (a hub repository's
    ``config.json``); None when it gives none."""
    from timm.models import get_pretrained_cfg, load_model_config_from_hf

    timm_name, source = timm_weights(name.removeprefix("timm/"), pretrained)
    if timm_name.startswith(HUB_PREFIX):
        with hub_errors(source):
            found = load_model_config_from_hf(source)[0] or {}
        mean, std = found.get("mean"), found.get("std")
    else:
        cfg = get_pretrained_cfg(timm_name)
        mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]

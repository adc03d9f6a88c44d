"""Any timm model as a Backbone: ``create_model("timm/resnet18")``; weights only with ``pretrained``
(``models.pretrained``: through timm and the Hugging Face hub cache).

Stages come from timm's ``feature_info``; ``forward_stages`` uses ``forward_intermediates``
(transformers' maps are returned as tokens (B, N, C), ``token_layout="nlc"``). ``sequence()``
flattens the model's children in execution order down to the stage modules, found by running
``forward_features`` once with hooks (CNNs on a 64 px image) and checked to compose to the same output; models whose
forward does work outside modules (e.g. ViT's position embedding) get a ModelError.

Sequence entries cannot contain dots (``nn.Sequential`` names), so stage module paths are given
with ``_`` for ``.`` (``blocks.1`` -> ``blocks_1``) in ``feature_info`` and ``sequence()``.

Swin models also offer the stage outputs of the official HERBS code (an older timm whose Swin stages
ended with their patch merging): ``forward_merged_stages`` / ``merged_stage_info``. Stage i < L is
then timm's stage i passed through stage i+1's patch merging (``layers[i+1].downsample``, which
current timm runs at the start of stage i+1); the last stage is unchanged. Swin-L at 384 px:
2304 / 576 / 144 / 144 tokens of 384 / 768 / 1536 / 1536 channels instead of 9216 / 2304 / 576 / 144
of 192 / 384 / 768 / 1536.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from coarse2fine.errors import ModelError
from coarse2fine.models.base import Backbone, StageInfo
from coarse2fine.models.pretrained import create_pretrained_timm

PREFIX = "timm/"


def _seq_name(path: str) -> str:
    return path.replace(".", "_")


class TimmHead(nn.Module):
    """The model's ``forward_head`` on a shell of the model that holds only its head modules."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        shell = copy.copy(model)
        shell.__dict__ = dict(model.__dict__)
        shell._parameters, shell._buffers = {}, {}
        shell._modules = {n: model._modules[n] for n in names}
        shell._forward_hooks, shell._forward_pre_hooks = {}, {}
        self.body = shell

    def forward(self, x: Tensor) -> Tensor:
        return self.body.forward_head(x)


class TimmBackbone(Backbone):
    """A timm model under the Backbone contract; ``pretrained`` (``model.pretrained``) names its weights
    (``models.pretrained``: timm re-creates the head for ``num_classes`` and adapts ``in_chans``)."""

    def __init__(
        self, name: str, num_classes: int = 1000, in_chans: int = 3, pretrained: bool | str = False, **kwargs: Any
    ) -> None:
        super().__init__()
        import timm

        shape = {"num_classes": num_classes, "in_chans": in_chans}
        try:
            if pretrained:
                self.model = create_pretrained_timm(name, pretrained, **shape, **kwargs)
            else:
                self.model = timm.create_model(name, pretrained=False, **shape, **kwargs)
        except ModelError:
            raise
        except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
            raise ModelError(f"timm model {name!r} could not be created with {kwargs}: {exc}") from exc
        self.timm_name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        size = kwargs.get("img_size") or self.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.default_input_size = (in_chans, int(h), int(w))
        infos = getattr(self.model, "feature_info", None)
        if not infos or not hasattr(self.model, "forward_intermediates"):
            raise ModelError(f"timm model {name!r} has no feature_info / forward_intermediates to give stages")
        self._stage_paths = [f["module"] for f in infos]
        self.feature_info = [
            StageInfo(f"stage{i}", int(f["num_chs"]), int(f["reduction"]), _seq_name(f["module"]))
            for i, f in enumerate(infos, 1)
        ]
        self.token_layout = "nlc" if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else "nchw"
        self._sequence_names: list[str] | None = None
        classifier = self.model.get_classifier()
        self.classifier_name = next(
            (f"model.{n}" for n, m in self.model.named_modules() if m is classifier and n), "model"
        )

    # ---- forward ----------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.model.forward_head(feats)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        outs = self.model.forward_intermediates(x, intermediates_only=True)
        if self.token_layout == "nlc":
            outs = [o.flatten(2).transpose(1, 2) for o in outs]  # NCHW -> (B, N, C)
        return list(outs)

    def _merging_layers(self) -> list[nn.Module]:
        """``layers[1:]``'s patch-merging modules; ModelError when the model has no such Swin stages."""
        layers = getattr(self.model, "layers", None)
        paths = [f"layers.{i}" for i in range(len(self.feature_info))]
        merging = [getattr(layer, "downsample", None) for layer in list(layers or [])[1:]]
        if (
            self.token_layout != "nlc"
            or self._stage_paths != paths
            or not merging
            or any(m is None or isinstance(m, nn.Identity) for m in merging)
        ):
            raise ModelError(
                f"timm model {self.timm_name!r} has no Swin stages with patch merging (layers[i].downsample), "
                "so herbs.swin_stages=merged does not apply; use a timm/swin_* model or swin_stages=timm"
            )
        return merging

    def merged_stage_info(self) -> list[StageInfo]:
        """Stage infos of ``forward_merged_stages`` (see the module docstring)."""
        self._merging_layers()
        infos = self.feature_info
        merged = [  # stage i: the channels and stride of stage i+1, whose patch merging it went through
            StageInfo(infos[i].name, infos[i + 1].channels, infos[i + 1].reduction, f"{infos[i + 1].module}_downsample")
            for i in range(len(infos) - 1)
        ]
        return [*merged, infos[-1]]

    def forward_merged_stages(self, x: Tensor) -> list[Tensor]:
        """Swin stage outputs taken after the next stage's patch merging, as tokens (B, N, C)."""
        merging = self._merging_layers()
        outs = self.model.forward_intermediates(x, intermediates_only=True)  # NCHW
        merged = [m(o.permute(0, 2, 3, 1)) for m, o in zip(merging, outs[:-1])]  # NHWC, as the stages run
        return [o.flatten(1, 2) for o in merged] + [outs[-1].flatten(2).transpose(1, 2)]

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)
        self.num_classes = num_classes

    # ---- sequence ---------------------------------------------------------------------------------
    def _candidates(self) -> list[str]:
        """Children paths, expanded wherever a stage module lies strictly inside."""
        out: list[str] = []

        def expand(prefix: str, module: nn.Module) -> None:
            for n, child in module.named_children():
                path = f"{prefix}{n}"
                if any(p.startswith(path + ".") for p in self._stage_paths):
                    expand(path + ".", child)
                else:
                    out.append(path)

        expand("", self.model)
        return out

    @torch.no_grad()
    def _trace(self) -> list[str]:
        """Order in which ``forward_features`` calls the candidate modules, checked to compose."""
        mods = dict(self.model.named_modules())
        order: list[str] = []
        handles = []
        for path in self._candidates():
            def hook(_m: nn.Module, _i: Any, _o: Any, path: str = path) -> None:
                if path not in order:
                    order.append(path)
            handles.append(mods[path].register_forward_hook(hook))
        was_training = self.training
        self.eval()
        try:
            c, h, w = self.default_input_size
            if self.token_layout == "nchw":  # CNNs run on any size: trace on a small one
                least = max(64, *self.model.pretrained_cfg.get("min_input_size", (c, 64, 64))[1:])
                h, w = min(h, least), min(w, least)
            x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
            x = x.to(next(self.model.parameters()).device)
            ref = self.model.forward_features(x)
            for h in handles:
                h.remove()
            y = x
            for path in order:
                y = mods[path](y)
        except Exception as exc:  # any failure: not a chain of modules
            raise ModelError(f"timm model {self.timm_name!r} cannot be split into a sequence: {exc}") from exc
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        missing = [p for p in self._stage_paths if p not in order]
        if missing or y.shape != ref.shape or not torch.allclose(y, ref, atol=1e-5, rtol=1e-4):
            raise ModelError(
                f"timm model {self.timm_name!r} cannot be split into a sequence: its forward_features is not "
                "a chain of its child modules (split/HD-CNN need one; stages still work)"
            )
        return order

    def sequence(self) -> list[tuple[str, nn.Module]]:
        if self._sequence_names is None:
            self._sequence_names = self._trace()
        mods = dict(self.model.named_modules())
        body = [(_seq_name(p), mods[p]) for p in self._sequence_names]
        used = {p.split(".")[0] for p in self._sequence_names}
        head_names = [n for n, _ in self.model.named_children() if n not in used]
        return [*body, ("head", TimmHead(self.model, head_names))]


def create_timm(
    name: str, num_classes: int = 1000, in_chans: int = 3, pretrained: bool | str = False, **kwargs: Any
) -> TimmBackbone:
    """``timm/<name>`` from the factory."""
    import timm

    if not timm.is_model(name):  # also accepts <name>.<tag>
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = ", ".join(PREFIX + c for c in close) or "none"
        raise ModelError(f"unknown timm model {name!r}; close matches: {hint}")
    return TimmBackbone(name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)

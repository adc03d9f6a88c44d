"""HERBS on any backbone (METHODS.md §3): ``HERBS`` and ``build_herbs``.

The backbone gives its stage outputs (``forward_stages``, CNN maps or transformer tokens); the
used stages are fused (``fpn.FeatureFusion``), classified per token on the top-down (k1) and
bottom-up (k2) paths, the selector keeps the confident tokens of the k2 maps, and the combiner
merges the kept tokens. The prediction is ``log(mean softmax)`` of the 9 outputs (METHODS.md §3: the sum of
the softmax; normalising keeps the argmax and gives a distribution).

Basic variants for a plain backbone (paper Fig. 3), ``cfg.basic``:

- ``bs``: background suppression on the last block only: projection, k2 classifier, selector,
  combiner; losses merged + layer + dropped.
- ``refine``: high-temperature refinement on the last two blocks: k1 on block L-1 learns
  ``softmax(Y_L / T)`` of the k2 classifier on block L (its map resized to block L-1's grid); the
  block-L classifier stands for the backbone's own and is trained by cross-entropy (as ``merged``,
  weight ``lambda_merged``); losses merged + refine.

A basic variant ignores the ``use_*`` switches (only its own parts exist).

``cfg.swin_stages='merged'`` takes a timm Swin's stages as the official code saw them (each stage
after the next stage's patch merging; ``TimmBackbone.forward_merged_stages``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from coarse2fine.config import HERBSConfig, validate
from coarse2fine.errors import ConfigError, ModelError
from coarse2fine.herbs.combiner import GraphCombiner
from coarse2fine.herbs.fpn import FeatureFusion, Grid, TokenClassifier, resize_tokens, to_tokens
from coarse2fine.herbs.objective import HERBSObjective
from coarse2fine.herbs.selector import Selector, default_num_selects

log = logging.getLogger(__name__)

SWIN_STAGES = ("timm", "merged")


def _input_hw(backbone: nn.Module, input_size: int | Sequence[int] | None) -> tuple[int, int, int]:
    """``(C, H, W)`` from an int, ``(H, W)``, ``(C, H, W)`` or None (the backbone's default)."""
    in_chans = int(getattr(backbone, "in_chans", 3))
    if input_size is None:
        default = getattr(backbone, "default_input_size", None)
        if default is None:
            raise ModelError("build_herbs needs input_size: the backbone has no default_input_size")
        return tuple(int(v) for v in default)  # type: ignore[return-value]
    if isinstance(input_size, int):
        return in_chans, input_size, input_size
    size = [int(v) for v in input_size]
    if len(size) == 2:
        return in_chans, size[0], size[1]
    if len(size) == 3:
        return size[0], size[1], size[2]
    raise ModelError(f"input_size {input_size!r}: expected an int, (H, W) or (C, H, W)")


def _stage_infos(backbone: nn.Module, swin_stages: str) -> list[Any]:
    """The backbone's stages as HERBS takes them: ``feature_info``, or the merged Swin stages."""
    if swin_stages not in SWIN_STAGES:
        raise ConfigError(f"herbs.swin_stages = {swin_stages!r}: expected timm or merged")
    if swin_stages == "timm":
        return list(backbone.feature_info)
    if not hasattr(backbone, "merged_stage_info"):
        raise ModelError(
            f"herbs.swin_stages=merged needs a timm Swin backbone (timm/swin_*), got {type(backbone).__name__}"
        )
    return list(backbone.merged_stage_info())


def _choose_stages(backbone: nn.Module, infos: list[Any], cfg: HERBSConfig) -> list[int]:
    """Indices (into ``infos``, the backbone's stages) of the stages HERBS uses."""
    names = [s.name for s in infos]
    model_name = type(backbone).__name__
    if cfg.stages:
        missing = [s for s in cfg.stages if s not in names]
        if missing:
            raise ModelError(f"herbs.stages {missing} not in backbone {model_name}; its stages: {names}")
        chosen = sorted(names.index(s) for s in dict.fromkeys(cfg.stages))
    elif cfg.basic:
        chosen = list(range(len(names)))  # the last block(s) are taken below
    else:
        want = len(cfg.num_selects) if cfg.num_selects else 4
        if cfg.num_selects and want > len(names):
            raise ModelError(
                f"herbs.num_selects has {want} entries (one per stage) but backbone {model_name} has only "
                f"{len(names)} stages: {names}"
            )
        chosen = list(range(max(0, len(names) - want), len(names)))
    need = {"bs": 1, "refine": 2}.get(cfg.basic or "", 2)
    what = f"basic={cfg.basic!r}" if cfg.basic else "HERBS (feature pyramid)"
    if len(chosen) < need:
        raise ModelError(
            f"{what} needs at least {need} backbone stages; backbone {model_name} offers {len(chosen)}: "
            f"{[names[i] for i in chosen] if cfg.stages else names}"
        )
    if cfg.basic == "bs":
        return chosen[-1:]
    if cfg.basic == "refine":
        return chosen[-2:]
    return chosen


def _freeze_unused(backbone: nn.Module, outs: Sequence[Tensor]) -> list[str]:
    """Parameters that the used stage outputs do not depend on (e.g. the backbone's classifier)
    get ``requires_grad=False``, so DDP and the optimiser never see parameters without gradients."""
    torch.stack([o.float().sum() for o in outs]).sum().backward()
    unused = []
    for name, p in backbone.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            unused.append(name)
        p.grad = None
    return unused


class HERBS(nn.Module):
    """HERBS wrapped around ``backbone`` (see the module docstring; METHODS.md §3).

    ``cfg``'s choices and switch combinations are checked when the config is loaded
    (``coarse2fine.config``); here only what depends on the backbone is.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cfg: HERBSConfig,
        input_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        if not hasattr(backbone, "forward_stages") or not getattr(backbone, "feature_info", None):
            raise ModelError(f"{type(backbone).__name__} is not a Backbone with feature stages (forward_stages)")
        self.backbone = backbone
        self.num_classes = num_classes
        self.basic = cfg.basic
        self.layout = getattr(backbone, "token_layout", "nchw")
        self.input_size = _input_hw(backbone, input_size)
        self.swin_stages = cfg.swin_stages
        all_infos = _stage_infos(backbone, cfg.swin_stages)
        self.stage_index = _choose_stages(backbone, all_infos, cfg)
        infos = [all_infos[i] for i in self.stage_index]
        self.stage_names = [s.name for s in infos]
        self.reductions = [int(s.reduction) for s in infos]

        # Probe once at the build size: token counts and grids, and which parameters are unused.
        was_training = backbone.training
        backbone.eval()
        try:
            param = next(backbone.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            outs = self._stages(torch.zeros(1, *self.input_size, device=device))
            used = [outs[i] for i in self.stage_index]
            self.frozen_unused = _freeze_unused(backbone, used)
        finally:
            backbone.train(was_training)
        toks = [to_tokens(o.detach(), self.layout, self.input_size[1:], r) for o, r in zip(used, self.reductions)]
        self.token_counts = [t.shape[1] for t, _ in toks]
        channels = [t.shape[2] for t, _ in toks]
        for info, c in zip(infos, channels):
            if info.channels != c:
                log.warning("stage %s: feature_info says %d channels, output has %d", info.name, info.channels, c)

        n = len(self.stage_index)
        full = cfg.basic is None
        use_selection = cfg.use_selection if full else cfg.basic == "bs"
        use_combiner = cfg.use_combiner if full else cfg.basic == "bs"
        use_refinement = cfg.use_refinement if full else cfg.basic == "refine"
        use_bottom_up = cfg.use_bottom_up and full
        self.fusion = FeatureFusion(
            channels,
            cfg.fpn_size,
            top_down=cfg.use_fpn and full,
            bottom_up=use_bottom_up,
            bottom_up_proj=cfg.bottom_up_proj,
        )

        # Which stages carry a k1 (student, top-down) and a k2 (bottom-up / final) classifier.
        if cfg.basic == "refine":
            self.k1_stages, self.k2_stages, self.pairs = [0], [1], [(0, 1)]
        else:
            self.k2_stages = list(range(n))
            self.k1_stages = list(range(n)) if use_refinement else []
            self.pairs = [(i, i) for i in self.k1_stages]
        self.k1 = nn.ModuleList(TokenClassifier(cfg.fpn_size, num_classes) for _ in self.k1_stages)
        self.k2 = nn.ModuleList(TokenClassifier(cfg.fpn_size, num_classes) for _ in self.k2_stages)

        self.selector: Selector | None = None
        kept_counts = [self.token_counts[i] for i in self.k2_stages]
        if use_selection:
            spec = list(cfg.num_selects) if cfg.num_selects else default_num_selects(len(self.k2_stages))
            names = [self.stage_names[i] for i in self.k2_stages]
            self.selector = Selector(spec, names, cfg.rank_by)
            kept_counts = self.selector.counts(kept_counts)  # raises for K_i > N_i at the build size
        self.kept_counts = kept_counts

        self.combiner: GraphCombiner | None = None
        if use_combiner:
            total = sum(kept_counts)
            nodes = cfg.num_graph_nodes or max(4, total // 64)  # official: total // 64
            self.combiner = GraphCombiner(cfg.fpn_size, num_classes, nodes, pool=cfg.combiner_pool, num_tokens=total)

    # ------------------------------------------------------------------------------------------
    def _stages(self, x: Tensor) -> list[Tensor]:
        if self.swin_stages == "merged":
            return self.backbone.forward_merged_stages(x)
        return self.backbone.forward_stages(x)

    def head_names(self) -> list[str]:
        names = [f"td_{i + 1}" for i in self.k1_stages] + [f"bu_{i + 1}" for i in self.k2_stages]
        return [*names, "combiner"] if self.combiner is not None else names

    def _run(self, x: Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
        hw = (x.shape[-2], x.shape[-1])
        outs = self._stages(x)
        toks: list[Tensor] = []
        grids: list[Grid] = []
        for i, r in zip(self.stage_index, self.reductions):
            t, g = to_tokens(outs[i], self.layout, hw, r)
            toks.append(t)
            grids.append(g)
        td, bu = self.fusion(toks, grids)
        final = bu if bu is not None else td
        k1_maps = {i: head(td[i]) for i, head in zip(self.k1_stages, self.k1)}
        k2_maps = {i: head(final[i]) for i, head in zip(self.k2_stages, self.k2)}

        heads: dict[str, Tensor] = {f"td_{i + 1}": m.mean(1) for i, m in k1_maps.items()}
        heads.update({f"bu_{i + 1}": m.mean(1) for i, m in k2_maps.items()})
        if self.basic == "refine":  # the last block's classifier plays the backbone's own: CE at lambda_merged
            out: dict[str, Any] = {"layer_logits": [], "merged": heads[f"bu_{self.k2_stages[-1] + 1}"]}
        else:
            out = {"layer_logits": [k2_maps[i].mean(1) for i in self.k2_stages]}

        selections = None
        if self.selector is not None:
            selections = self.selector([final[i] for i in self.k2_stages], [k2_maps[i] for i in self.k2_stages])
            out["dropped"] = [s.dropped_logits for s in selections]
            out["kept_index"] = [s.kept_index for s in selections]
        if self.combiner is not None:
            if selections is not None:
                kept = torch.cat([s.kept for s in selections], dim=1)
            else:
                kept = torch.cat([final[i] for i in self.k2_stages], dim=1)
            out["merged"] = heads["combiner"] = self.combiner(kept)

        if self.pairs:
            out["refine_student"] = [k1_maps[s] for s, _ in self.pairs]
            out["refine_target"] = [
                resize_tokens(k2_maps[t], grids[t], toks[s].shape[1], grids[s], pool=False) for s, t in self.pairs
            ]
        log_probs = torch.stack([h.float().log_softmax(-1) for h in heads.values()])
        out["logits"] = torch.logsumexp(log_probs, 0) - math.log(len(heads))
        out["heads"] = heads
        extras = {"grids": grids, "k1_maps": k1_maps, "k2_maps": k2_maps, "selections": selections}
        return out, extras

    def forward(self, x: Tensor) -> dict[str, Any]:
        """Output dict: ``logits`` (log mean softmax of all heads), ``heads`` (token-averaged
        ``td_i``, ``bu_i``, ``combiner``), and the loss inputs ``layer_logits``, ``dropped``,
        ``merged``, ``refine_student``, ``refine_target`` (present when the part exists)."""
        return self._run(x)[0]

    @torch.no_grad()
    def explain(self, x: Tensor) -> dict[str, Any]:
        """For pictures: probabilities, per-stage grids and strides (input pixels per token), kept token
        indices and k2 class maps."""
        out, extras = self._run(x)
        return {
            "probs": out["logits"].exp(),
            "stage_names": [self.stage_names[i] for i in self.k2_stages],
            "grids": [extras["grids"][i] for i in self.k2_stages],
            "reductions": [self.reductions[i] for i in self.k2_stages],
            "maps": [extras["k2_maps"][i] for i in self.k2_stages],
            "kept_index": out.get("kept_index"),
        }


def build_herbs(
    backbone: nn.Module,
    num_classes: int,
    cfg: HERBSConfig,
    input_size: int | Sequence[int] | None = None,
) -> tuple[HERBS, HERBSObjective]:
    """HERBS around ``backbone`` and its loss (METHODS.md §3). ``input_size``: int, (H, W) or (C, H, W);
    it fixes the combiner's token count under ``combiner_pool='linear'`` and the count checks. ``cfg`` is
    checked as a recipe's ``herbs`` section is (ConfigError naming ``herbs.<key>``)."""
    cfg = validate(cfg, "herbs")
    model = HERBS(backbone, num_classes, cfg, input_size)
    return model, HERBSObjective(cfg)

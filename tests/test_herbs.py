"""HERBS (METHODS.md §3): fusion, selector, combiner, model variants, losses, a tiny training run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coarse2fine.config import HERBSConfig
from coarse2fine.errors import ConfigError, ModelError
from coarse2fine.herbs import (
    FeatureFusion,
    GraphCombiner,
    HERBSObjective,
    Selector,
    build_herbs,
    resize_tokens,
    temperature_at,
    to_tokens,
)
from helpers.models import NUM_CLASSES, TinyCNN, TinyTokens


def cfg_(**kw) -> HERBSConfig:
    return dataclasses.replace(HERBSConfig(fpn_size=16), **kw)


def check_outputs(out: dict, batch: int, heads: set[str]) -> None:
    assert set(out["heads"]) == heads
    assert out["logits"].shape == (batch, NUM_CLASSES)
    for h in out["heads"].values():
        assert h.shape == (batch, NUM_CLASSES)
    assert torch.allclose(out["logits"].exp().sum(-1), torch.ones(batch), atol=1e-5)
    # the prediction is the mean of the softmax of all heads
    mean = torch.stack([h.softmax(-1) for h in out["heads"].values()]).mean(0)
    assert torch.allclose(out["logits"].exp(), mean, atol=1e-5)


ALL_HEADS = {f"td_{i}" for i in range(1, 5)} | {f"bu_{i}" for i in range(1, 5)} | {"combiner"}


@pytest.mark.parametrize("make", [TinyCNN, TinyTokens], ids=["cnn", "tokens"])
def test_shapes_two_input_sizes(make) -> None:
    torch.manual_seed(0)
    model, _ = build_herbs(make(), NUM_CLASSES, cfg_(combiner_pool="attention"), input_size=32)
    model.eval()
    for size in [(32, 32), (48, 64)]:
        x = torch.randn(2, model.input_size[0], *size)
        out = model(x)
        check_outputs(out, 2, ALL_HEADS)
        assert len(out["dropped"]) == 4 and len(out["refine_student"]) == 4
        for s, t in zip(out["refine_student"], out["refine_target"]):
            assert s.shape == t.shape
        stages = model.backbone.forward_stages(x)
        for kept, dropped, st in zip(out["kept_index"], out["dropped"], stages):
            n = st.shape[1] if st.dim() == 3 else st.shape[2] * st.shape[3]
            assert kept.shape[1] + dropped.shape[1] == n and kept.shape[1] >= 1


def test_linear_combiner_fixed_size_and_counts() -> None:
    model, _ = build_herbs(TinyCNN(), NUM_CLASSES, cfg_(), input_size=32)
    model.eval()
    # default official fractions of 256, 64, 16, 4 tokens
    assert model.token_counts == [256, 64, 16, 4]
    assert model.kept_counts == [round(256 * 256 / 2304), round(64 * 128 / 576), round(16 * 64 / 144), 1]
    check_outputs(model(torch.randn(2, 1, 32, 32)), 2, ALL_HEADS)
    with pytest.raises(ModelError, match="combiner_pool=attention"):
        model(torch.randn(2, 1, 48, 48))
    # counts keep the kept-token total fixed, so linear pooling works at another size
    model, _ = build_herbs(TinyCNN(), NUM_CLASSES, cfg_(num_selects=[8, 4, 2, 1]), input_size=32)
    model.eval()
    check_outputs(model(torch.randn(2, 1, 48, 48)), 2, ALL_HEADS)


def test_tokens_grid_and_1d_fallback() -> None:
    x = torch.randn(2, 24, 6)  # 24 tokens from a 16 x 24 input at reduction 4 -> 4 x 6 grid
    t, g = to_tokens(x, "nlc", (16, 24), 4)
    assert g == (4, 6) and t.shape == (2, 24, 6)
    t, g = to_tokens(torch.randn(2, 17, 6), "nlc", (16, 16), 4)  # class token + 16: stays 1-D
    assert g is None
    up = resize_tokens(t, None, 34, None, pool=False)
    down = resize_tokens(t, None, 5, (1, 5), pool=True)
    assert up.shape == (2, 34, 6) and down.shape == (2, 5, 6)
    c, g = to_tokens(torch.randn(2, 3, 5, 7), "nchw", (20, 28), 4)
    assert c.shape == (2, 35, 3) and g == (5, 7)
    with pytest.raises(ModelError):
        to_tokens(torch.randn(2, 3, 5), "nchw", (20, 28), 4)


class OfficialBottomUp(nn.Module):
    """The official bottom-up block, re-implemented from its description for the test: every stage's
    top-down output first goes through its own Linear - ReLU - Linear (F -> F); then, in stage order,
    stage i+1 += Down_i(stage i), stage i already updated. The official Down_i is a Conv1d over the
    token axis (tied to one input size); ours is adaptive pooling + a per-token Linear, used here too."""

    def __init__(self, names: list[str], fpn_size: int):
        super().__init__()
        self.names = names
        for name in names:
            proj = nn.Sequential(nn.Linear(fpn_size, fpn_size), nn.ReLU(), nn.Linear(fpn_size, fpn_size))
            self.add_module("Proj_" + name, proj)
        for name in names[:-1]:
            self.add_module("Down_" + name, nn.Linear(fpn_size, fpn_size))

    def forward(self, x: dict[str, Tensor], grids: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
        x = {name: getattr(self, "Proj_" + name)(x[name]) for name in self.names}
        for lo, hi in zip(self.names[:-1], self.names[1:]):
            pooled = resize_tokens(x[lo], grids[lo], x[hi].shape[1], grids[hi], pool=True)
            x[hi] = x[hi] + getattr(self, "Down_" + lo)(pooled)
        return x


def test_bottom_up_projection_matches_official_block() -> None:
    torch.manual_seed(4)
    f, grids = 6, [(4, 4), (2, 2), (1, 1)]
    fusion = FeatureFusion([3, 5, 7], f)
    tokens = [torch.randn(2, h * w, c) for (h, w), c in zip(grids, [3, 5, 7])]
    td, bu = fusion(tokens, grids)
    names = [f"layer{i + 1}" for i in range(3)]
    ref = OfficialBottomUp(names, f)
    for i, name in enumerate(names):  # same weights copied in
        getattr(ref, "Proj_" + name).load_state_dict(fusion.bu_proj[i].state_dict())
        if i < 2:
            getattr(ref, "Down_" + name).load_state_dict(fusion.down[i].state_dict())
    expected = ref(dict(zip(names, td)), dict(zip(names, grids)))
    for i, name in enumerate(names):
        torch.testing.assert_close(bu[i], expected[name], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(bu[0], td[0])  # stage 1's k1 and k2 see different features
    # without the projection: b_1 = t_1 and b_i = t_i + W_i Down(b_{i-1}), parameters F x F fewer per stage
    plain = FeatureFusion([3, 5, 7], f, bottom_up_proj=False)
    plain.load_state_dict(fusion.state_dict(), strict=False)
    td2, bu2 = plain(tokens, grids)
    assert plain.bu_proj is None and bu2[0] is td2[0]
    torch.testing.assert_close(td2[2], td[2])
    model, _ = build_herbs(TinyCNN(), NUM_CLASSES, cfg_(bottom_up_proj=False), input_size=32)
    assert model.fusion.bu_proj is None
    assert len(build_herbs(TinyCNN(), NUM_CLASSES, cfg_(), input_size=32)[0].fusion.bu_proj) == 4


@pytest.mark.parametrize("rank_by", ["official", "paper"])
def test_selector_keeps_top_k(rank_by: str) -> None:
    torch.manual_seed(1)
    b, n, c, f = 3, 20, 4, 6
    feats, logits = torch.randn(b, n, f), torch.randn(b, n, c) * 3
    sel = Selector([5], ["stage4"], rank_by)
    (s,) = sel([feats], [logits])
    assert s.kept.shape == (b, 5, f) and s.kept_logits.shape == (b, 5, c) and s.dropped_logits.shape == (b, 15, c)
    probs = logits.softmax(-1)
    for i in range(b):
        score = probs[i].max(-1).values if rank_by == "paper" else probs[i, :, logits[i].mean(0).argmax()]
        expected = set(score.topk(5).indices.tolist())
        kept = set(s.kept_index[i].tolist())
        assert kept == expected
        assert kept.isdisjoint(s.dropped_index[i].tolist())
        assert kept | set(s.dropped_index[i].tolist()) == set(range(n))
        assert torch.equal(s.kept[i], feats[i, s.kept_index[i]])
        assert torch.equal(s.dropped_logits[i], logits[i, s.dropped_index[i]])
        assert score[s.kept_index[i]].min() >= score[s.dropped_index[i]].max()


def test_selector_bad_inputs() -> None:
    sel = Selector([30, 0.5], ["stage3", "stage4"])
    with pytest.raises(ModelError, match=r"stage3.*20 tokens.*30"):
        sel([torch.randn(1, 20, 4), torch.randn(1, 8, 4)], [torch.randn(1, 20, 3), torch.randn(1, 8, 3)])
    assert sel.counts([40, 8]) == [30, 4]
    with pytest.raises(ConfigError):
        Selector([2.5], ["stage4"])
    with pytest.raises(ConfigError):
        Selector([0.5], ["stage3", "stage4"])
    with pytest.raises(ConfigError):
        Selector([0.5], ["stage4"], rank_by="max")


def test_combiner_shapes() -> None:
    lin = GraphCombiner(8, NUM_CLASSES, 3, pool="linear", num_tokens=12)
    assert lin(torch.randn(4, 12, 8)).shape == (4, NUM_CLASSES)
    with pytest.raises(ModelError):
        lin(torch.randn(4, 13, 8))
    att = GraphCombiner(8, NUM_CLASSES, 3, pool="attention")
    for s in (12, 31):
        assert att(torch.randn(4, s, 8)).shape == (4, NUM_CLASSES)
    with pytest.raises(ConfigError):
        GraphCombiner(8, NUM_CLASSES, 3, pool="mean")


def test_losses_on_hand_made_inputs() -> None:
    obj = HERBSObjective(HERBSConfig())
    y = torch.tensor([0, 2])
    merged = torch.randn(2, 3)
    layer = [torch.randn(2, 3), torch.randn(2, 3)]
    student = [torch.randn(2, 7, 3)]
    out = obj(
        {
            "merged": merged,
            "layer_logits": layer,
            "dropped": [torch.full((2, 5, 3), -50.0), torch.zeros(2, 0, 3)],
            "refine_student": student,
            "refine_target": [student[0].clone()],
        },
        y,
    )
    assert set(out) == {"merged", "layer", "dropped", "refine", "loss"}
    assert torch.allclose(out["merged"], F.cross_entropy(merged, y))
    assert torch.allclose(out["layer"], sum(F.cross_entropy(lg, y) for lg in layer))
    assert out["dropped"].item() < 1e-6
    assert abs(out["refine"].item()) < 1e-6
    assert torch.allclose(out["loss"], out["merged"] + 0.3 * out["layer"], atol=1e-5)
    # dropped logits at 0 -> tanh 0 -> squared error 1 per stage
    out = obj({"dropped": [torch.zeros(2, 4, 3), torch.zeros(1, 2, 3)]}, y)
    assert torch.allclose(out["dropped"], torch.tensor(2.0)) and torch.allclose(out["loss"], torch.tensor(10.0))
    # refinement: KL(p || q) of the tempered softmaxes; gradient reaches only the student
    s = torch.randn(2, 4, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, requires_grad=True)
    obj.set_epoch(0)
    out = obj({"refine_student": [s], "refine_target": [t]}, y)
    p, q = (t / 64).softmax(-1), (s / 64).softmax(-1)
    assert torch.allclose(out["refine"], (p * (p.log() - q.log())).sum(-1).mean(), atol=1e-7)
    out["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_refine_reduction_mean_is_official_kldivloss() -> None:
    """``mean`` equals the official nn.KLDivLoss() (default reduction: the mean over all B x N_i x C
    elements of a stage, as in torch 1.x where the official code ran) summed over stages; ``sum``
    (the paper's formula) is C times it."""
    torch.manual_seed(3)
    c, temp = 7, 4.0
    students = [torch.randn(3, n, c) * 5 for n in (16, 4)]
    targets = [torch.randn(3, n, c) * 5 for n in (16, 4)]
    outs = {"refine_student": students, "refine_target": targets}
    y = torch.zeros(3, dtype=torch.long)
    official = sum(
        nn.KLDivLoss()(F.log_softmax(s / temp, dim=-1), F.softmax(t / temp, dim=-1))
        for s, t in zip(students, targets)
    )
    terms = {}
    for red in ("mean", "sum"):
        obj = HERBSObjective(HERBSConfig(temperature=temp, refine_reduction=red))
        terms[red] = obj(outs, y)["refine"]
    elementwise = sum(  # p (log p - log q), averaged over every element of the stage
        (F.softmax(t / temp, -1) * (F.log_softmax(t / temp, -1) - F.log_softmax(s / temp, -1))).mean()
        for s, t in zip(students, targets)
    )
    assert torch.allclose(official, elementwise, rtol=1e-5, atol=1e-7)
    assert torch.allclose(terms["mean"], official, rtol=1e-5, atol=1e-7)
    assert torch.allclose(terms["sum"], c * official, rtol=1e-5, atol=1e-7)
    assert HERBSConfig().refine_reduction == "sum"
    with pytest.raises(ConfigError, match="refine_reduction"):
        HERBSObjective(HERBSConfig(refine_reduction="batchmean"))  # type: ignore[arg-type]


def test_temperature_schedule() -> None:
    obj = HERBSObjective(HERBSConfig(temperature=64, temperature_period=10))
    values = []
    for e in (0, 9, 10, 19, 20, 35):
        obj.set_epoch(e)
        values.append(obj.temperature)
    assert values == [64, 64, 32, 32, 16, 8]
    assert temperature_at(7, 10.0, 3) == 2.5


def test_basic_variants() -> None:
    torch.manual_seed(0)
    bs, obj = build_herbs(TinyCNN(), NUM_CLASSES, cfg_(basic="bs", num_selects=[0.25]), input_size=32)
    out = bs(torch.randn(2, 1, 32, 32))
    check_outputs(out, 2, {"bu_1", "combiner"})
    assert bs.stage_names == ["stage4"] and out["dropped"][0].shape == (2, 3, NUM_CLASSES)
    terms = obj(out, torch.tensor([0, 1]))
    assert terms["dropped"] > 0 and terms["refine"] == 0
    ref, obj = build_herbs(TinyCNN(), NUM_CLASSES, cfg_(basic="refine"), input_size=32)
    out = ref(torch.randn(2, 1, 32, 32))
    check_outputs(out, 2, {"td_1", "bu_2"})
    assert ref.stage_names == ["stage3", "stage4"] and "dropped" not in out
    assert out["merged"] is out["heads"]["bu_2"] and out["layer_logits"] == []
    assert out["refine_student"][0].shape == out["refine_target"][0].shape == (2, 16, NUM_CLASSES)
    terms = obj(out, torch.tensor([0, 1]))
    assert terms["refine"] > 0 and terms["layer"] == 0
    assert torch.allclose(terms["merged"], F.cross_entropy(out["heads"]["bu_2"], torch.tensor([0, 1])))


def test_ablation_switches() -> None:
    model, obj = build_herbs(
        TinyCNN(),
        NUM_CLASSES,
        cfg_(use_selection=False, use_combiner=False, use_refinement=False, use_fpn=False),
        input_size=32,
    )
    out = model(torch.randn(2, 1, 32, 32))
    check_outputs(out, 2, {f"bu_{i}" for i in range(1, 5)})
    assert "dropped" not in out and "refine_student" not in out and "merged" not in out
    assert obj(out, torch.tensor([0, 1]))["loss"] > 0
    model, _ = build_herbs(TinyCNN(), NUM_CLASSES, cfg_(use_combiner=False), input_size=32)
    check_outputs(model(torch.randn(2, 1, 32, 32)), 2, ALL_HEADS - {"combiner"})
    # use_refinement without use_bottom_up is refused when the config is loaded (tests/test_config.py)


def test_bad_inputs_stages() -> None:
    with pytest.raises(ModelError, match="at least 2"):
        build_herbs(TinyCNN(stages=1), NUM_CLASSES, cfg_(), input_size=32)
    with pytest.raises(ModelError, match="5 entries"):
        build_herbs(TinyCNN(), NUM_CLASSES, cfg_(num_selects=[0.5] * 5), input_size=32)
    with pytest.raises(ModelError, match="stage9"):
        build_herbs(TinyCNN(), NUM_CLASSES, cfg_(stages=["stage9"]), input_size=32)
    with pytest.raises(ModelError, match=r"stage4.*4 tokens.*keep 8"):
        build_herbs(TinyCNN(), NUM_CLASSES, cfg_(num_selects=[8, 8, 8, 8]), input_size=32)
    with pytest.raises(ModelError, match="basic='refine' needs at least 2"):
        build_herbs(TinyCNN(stages=1), NUM_CLASSES, cfg_(basic="refine"), input_size=32)
    with pytest.raises(ConfigError, match="2 entries for 1 stages"):
        build_herbs(TinyCNN(), NUM_CLASSES, cfg_(basic="bs", num_selects=[0.5, 0.5]), input_size=32)
    bs, _ = build_herbs(TinyCNN(stages=1), NUM_CLASSES, cfg_(basic="bs"), input_size=32)
    assert bs.stage_names == ["stage1"] and bs.kept_counts == [round(256 * 32 / 144)]
    # the unused classifier head of the backbone is frozen, everything HERBS uses trains
    model, _ = build_herbs(TinyCNN(), NUM_CLASSES, cfg_(stages=["stage2", "stage3"]), input_size=32)
    assert {n.split(".")[0] for n in model.frozen_unused} == {"head", "blocks"}
    assert all(n.startswith(("head", "blocks.3")) for n in model.frozen_unused)


def _toy_batch(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Class k: a bright 4x4 square in quadrant k of a noisy 16x16 image (4 classes)."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 1, 16, 16, generator=gen) * 0.3
    for k in range(4):
        r, c = divmod(k, 2)
        idx = y == k
        x[idx, :, 2 + 8 * r : 6 + 8 * r, 2 + 8 * c : 6 + 8 * c] += 2.0
    return x, y


def test_short_training_learns_tiny_problem() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    backbone = TinyCNN(num_classes=4)
    backbone.default_input_size = (1, 16, 16)
    model, obj = build_herbs(backbone, 4, cfg_(temperature=4.0), input_size=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    xt, yt = _toy_batch(200, gen)
    model.eval()
    with torch.no_grad():
        before = (model(xt)["logits"].argmax(-1) == yt).float().mean().item()
    model.train()
    first = None
    for _step in range(50):  # the bottom-up projections (official) make it a little slower than 30 steps
        x, y = _toy_batch(32, gen)
        terms = obj(model(x), y)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = terms["loss"].item() if first is None else first
    model.eval()
    with torch.no_grad():
        out = model(xt)
    acc = (out["logits"].argmax(-1) == yt).float().mean().item()
    assert terms["loss"].item() < first
    assert acc > 0.9 and acc > before + 0.3
    assert (out["heads"]["combiner"].argmax(-1) == yt).float().mean() > 0.7
    assert math.isfinite(terms["refine"].item())


def test_combiner_without_selector_is_refused_as_the_official_code_does() -> None:
    with pytest.raises(ConfigError, match=r"herbs\.use_combiner: reads the tokens the selector keeps"):
        build_herbs(TinyCNN(), NUM_CLASSES, cfg_(use_selection=False), input_size=32)

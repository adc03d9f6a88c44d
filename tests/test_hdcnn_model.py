"""HD-CNN network: aggregation, averaging, batched vs looped components, conditional execution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coarse2fine.errors import HierarchyError, ModelError
from coarse2fine.hdcnn.model import HDCNN, FineComponentNet, find_classifier, split_block
from coarse2fine.hierarchy import coarse_targets
from helpers.hdcnn import TinyBlock, old_layout_state

SETS = [[0, 1, 2], [2, 3], [3, 4, 5]]


def make(beta: float | None = None, fine_exec: str = "auto", sets=SETS, seed: int = 0, sharp: float = 1.0) -> HDCNN:
    torch.manual_seed(seed)
    model = HDCNN(TinyBlock(6), sets, "stage1", beta=beta, fine_exec=fine_exec)
    # make the fine components differ from each other (they start as copies of one rear)
    with torch.no_grad():
        for p in model.fine.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.coarse.head[3].weight.mul_(sharp)  # a confident coarse component routes sparsely
    return model


def test_aggregation_and_averaging_sum_to_one_and_zero_outside_partial_sets() -> None:
    model = make().eval()
    x = torch.randn(5, 1, 8, 8)
    out = model(x)
    assert torch.allclose(out["probs"].sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(out["coarse_probs"].sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(out["logits"].exp(), out["probs"], atol=1e-6)
    # aggregation by hand: B_ik = sum_{j in S_k} B^f_ij, L1-normalised
    bf = out["fine_probs_coarse"]
    agg = torch.stack([bf[:, s].sum(1) for s in SETS], 1)
    assert torch.allclose(out["coarse_probs"], agg / agg.sum(1, keepdim=True), atol=1e-6)
    # averaging by hand, one component at a time (classes outside S_k get 0)
    h = model.shared(x)
    expected = torch.zeros(5, 6)
    for k, s in enumerate(SETS):
        pk = F.softmax(model.fine.forward_one(k, h)[:, : len(s)], dim=1)
        full = torch.zeros(5, 6)
        full[:, s] = pk
        assert torch.all(full[:, [j for j in range(6) if j not in s]] == 0)
        expected += out["coarse_probs"][:, k : k + 1] * full
    assert torch.allclose(out["probs"], expected, atol=1e-5)
    assert out["components_run"].tolist() == [3] * 5


@pytest.mark.parametrize("rule", ["paper", "aggregation"])
def test_coarse_targets_against_an_exact_coarse_component(rule: str) -> None:
    """With a coarse component that is always right, the mean B_ik equals the ``aggregation`` targets;
    the paper's t_k differs when partial sets overlap (SETS share classes 2 and 3)."""
    model = make()
    counts = torch.tensor([3, 5, 2, 7, 4, 6])
    labels = torch.repeat_interleave(torch.arange(6), counts)
    agg = F.one_hot(labels, 6).float() @ model.membership  # the model's fine-to-coarse aggregation
    mean_b = (agg / agg.sum(1, keepdim=True)).mean(0)
    t = torch.as_tensor(coarse_targets(SETS, counts.numpy(), rule), dtype=torch.float32)
    assert torch.allclose(mean_b, t, atol=1e-6) == (rule == "aggregation")


def test_vmap_equals_loop_forward_and_gradients() -> None:
    a, b = make(fine_exec="vmap"), make(fine_exec="loop")
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(4, 1, 8, 8)
    oa, ob = a(x), b(x)
    assert torch.allclose(oa["probs"], ob["probs"], atol=1e-6)
    oa["logits"][:, 0].sum().backward()
    ob["logits"][:, 0].sum().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name
    # padding rows of the smaller components get no gradient
    w = a.fine.stacked()[0]["head.3.weight"]
    assert torch.all(w.grad[1, 2:] == 0)


def test_training_mode_updates_each_component_batchnorm_stats() -> None:
    model = make(fine_exec="vmap").train()
    before = model.fine.stacked()[1]["body.1.running_mean"].clone()
    model(torch.randn(4, 1, 8, 8))
    after = model.fine.stacked()[1]["body.1.running_mean"]
    assert not torch.allclose(before, after)
    assert int(model.fine.stacked()[1]["body.1.num_batches_tracked"][0]) == 1


def _count_calls(model: HDCNN) -> dict[int, int]:
    counts: dict[int, int] = {}
    original = model.fine.forward_one

    def counting(k: int, h: torch.Tensor) -> torch.Tensor:
        counts[k] = counts.get(k, 0) + h.shape[0]
        return original(k, h)

    model.fine.forward_one = counting  # type: ignore[method-assign]
    return counts


def test_conditional_execution_skips_work_and_matches_per_image_reference() -> None:
    model = make(beta=1.5, sharp=30.0).eval()
    x = torch.randn(16, 1, 8, 8)
    counts = _count_calls(model)
    out = model(x)
    coarse = out["coarse_probs"]
    keep = (coarse >= 1 / (1.5 * 3)) | F.one_hot(coarse.argmax(1), 3).bool()
    assert out["components_run"].tolist() == keep.sum(1).tolist()
    assert sum(counts.values()) == int(keep.sum()) < 16 * 3  # really fewer samples routed
    for k in range(3):
        assert counts.get(k, 0) == int(keep[:, k].sum())
    # per-image reference: each image alone through its kept components, renormalised
    h = model.shared(x)
    for i in range(16):
        ref = torch.zeros(6)
        for k in torch.nonzero(keep[i]).flatten().tolist():
            pk = F.softmax(model.fine.forward_one(k, h[i : i + 1])[0, : len(SETS[k])], 0)
            ref[SETS[k]] += coarse[i, k] * pk
        ref /= coarse[i, keep[i]].sum()
        assert torch.allclose(out["probs"][i], ref, atol=1e-5)
    assert torch.allclose(out["probs"].sum(1), torch.ones(16), atol=1e-5)


def test_large_beta_runs_everything_and_equals_full_model() -> None:
    model = make().eval()
    x = torch.randn(8, 1, 8, 8)
    full = model(x)
    cond = model(x, beta=1e9)
    assert cond["components_run"].tolist() == [3] * 8
    assert torch.allclose(full["probs"], cond["probs"], atol=1e-5)


SINGLE = [[0, 1, 2], [3], [2, 4, 5]]  # component 1: a one-class partial set


@pytest.mark.parametrize("fine_exec", ["vmap", "loop"])
def test_one_class_partial_set_has_no_component_and_gets_probability_b(fine_exec: str) -> None:
    model = make(sets=SINGLE, fine_exec=fine_exec, sharp=30.0).eval()
    # only the partial sets of more than one class are stacked: slot i is partial set runnable[i]
    assert model.runnable == [0, 2] and model.singletons == [1] and model.fine.num_components == 2
    assert [model.slot(k) for k in model.runnable] == [0, 1]
    assert all(p.shape[0] == 2 for p in model.fine.stacked()[0].values())
    x = torch.randn(16, 1, 8, 8)
    calls = _count_calls(model)  # keyed by slot
    full = model(x, beta=None)
    assert full["components_run"].tolist() == [2] * 16
    # by hand: p = sum_k B_ik p_k with p_1 = 1 on class 3
    h = model.shared(x)
    coarse = full["coarse_probs"]
    expected = coarse[:, 1:2] * F.one_hot(torch.full((16,), 3), 6).float()
    for k in (0, 2):
        local = F.softmax(model.fine.forward_one(model.slot(k), h)[:, :3], 1)
        expected[:, SINGLE[k]] += coarse[:, k : k + 1] * local
    assert torch.allclose(full["probs"], expected, atol=1e-5)
    calls.clear()
    routed = model(x, beta=1.5)
    keep = (coarse >= 1 / (1.5 * 3)) | F.one_hot(coarse.argmax(1), 3).bool()
    assert calls == {s: int(keep[:, k].sum()) for s, k in enumerate((0, 2)) if keep[:, k].any()}
    assert routed["components_run"].tolist() == keep[:, [0, 2]].sum(1).tolist()
    assert torch.allclose(routed["probs"].sum(1), torch.ones(16), atol=1e-5)
    assert torch.allclose(model(x, beta=1e9)["probs"], full["probs"], atol=1e-5)


def test_one_class_partial_set_vmap_equals_loop_in_training() -> None:
    a, b = make(sets=SINGLE, fine_exec="vmap"), make(sets=SINGLE, fine_exec="loop")
    b.load_state_dict(a.state_dict())
    for m in [*a.modules(), *b.modules(), *a.fine.template.modules(), *b.fine.template.modules()]:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # training mode (batch-norm statistics) without random masks
    x = torch.randn(6, 1, 8, 8)
    before = a.fine.stacked()[1]["body.1.running_mean"].clone()
    oa, ob = a.train()(x), b.train()(x)
    assert torch.allclose(oa["probs"], ob["probs"], atol=1e-5)
    stats_a, stats_b = a.fine.stacked()[1], b.fine.stacked()[1]
    assert torch.allclose(stats_a["body.1.running_mean"], stats_b["body.1.running_mean"], atol=1e-6)
    assert not torch.allclose(stats_a["body.1.running_mean"], before)  # both stored slots ran
    oa["logits"][:, 4].sum().backward()
    ob["logits"][:, 4].sum().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_one_class_partial_set_is_not_stored_counted_or_trainable() -> None:
    from coarse2fine.hdcnn.model import FineComponents

    model = make(sets=SINGLE)
    one = sum(p.numel() for p in model.fine.component(0).parameters())  # every slot has the same structure
    everything = FineComponents([model.fine.component(0) for _ in SINGLE])  # the earlier layout: K slots
    counted = sum(p.numel() for p in model.fine.parameters())
    assert counted == 2 * one == sum(p.numel() for p in everything.parameters()) - one
    with pytest.raises(ModelError, match="partial set 1 holds one class"):
        model.fine_component_net(1)
    with pytest.raises(ModelError, match="one class"):
        model.load_fine_component(1, model.fine_component_net(0))
    with pytest.raises(ModelError, match="does not exist"):
        model.slot(3)
    assert model.fine_component_net(2)(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(HierarchyError, match=r"smaller hdcnn\.num_coarse"):
        HDCNN(TinyBlock(3), [[0], [1], [2]], "stage1")  # every set one class: the coarse component alone


@pytest.mark.parametrize("beta", [None, 1.5])
def test_old_layout_with_one_class_slots_loads_with_the_same_outputs(beta: float | None) -> None:
    model = make(sets=SINGLE, sharp=30.0).eval()
    old = old_layout_state(model)
    assert old["fine.body__0__weight"].shape[0] == 3 * 8  # folded (K * out, in, kh, kw), K = 3 slots
    assert old["fine.head__3__bias"].shape[0] == 3
    fresh = HDCNN(TinyBlock(6), SINGLE, "stage1").eval()
    fresh.load_state_dict(old)  # strict: the one-class slot is dropped by the pre-hook
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(fresh(x, beta=beta)["probs"], model(x, beta=beta)["probs"])
    converted = fresh.convert_state_dict(old)
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
    assert fresh.convert_state_dict(model.state_dict()).keys() == model.state_dict().keys()  # new layout: as is


def test_old_layout_compressed_checkpoint_with_one_class_slots_loads() -> None:
    from coarse2fine.compress import apply_compression_structure
    from coarse2fine.hdcnn import compress_hdcnn

    torch.manual_seed(0)
    model = HDCNN(TinyBlock(6, width=32), SINGLE, "stage1").eval()
    report = compress_hdcnn(model, {"fine": {"body.0": (4, 8, "columns")}, "coarse": {"body.0": (4, 8)}})
    assert [r["component"] for r in report["fine_components"]] == [0, 2]  # one-class set 1: nothing compressed
    assert model.state_dict()["fine.body__0__weight__codes"].shape[0] == 2
    old = old_layout_state(model)
    assert "fine.body__0__weight" not in old and old["fine.body__0__weight__codes"].shape[0] == 3
    fresh = HDCNN(TinyBlock(6, width=32), SINGLE, "stage1").eval()
    apply_compression_structure(fresh, report["spec"])
    fresh.load_state_dict(old)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(fresh(x)["probs"], model(x)["probs"])
    assert torch.equal(fresh.fine.stacked()[0]["body.0.weight"], model.fine.stacked()[0]["body.0.weight"])


def test_report_cost_counts_stored_components_only() -> None:
    from coarse2fine.config import RunConfig, TrainConfig
    from coarse2fine.hierarchy import Hierarchy
    from coarse2fine.recipes.hdcnn_report import evaluate_hdcnn

    model = make(sets=SINGLE).eval()
    names = [f"c{j}" for j in range(6)]
    h = Hierarchy(names, [0, 0, 0, 1, 2, 2], SINGLE, ["a", "b", "c"])
    cfg = RunConfig(train=TrainConfig(device="cpu", amp="off"))
    loader = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 4, 5]))]
    cost = evaluate_hdcnn(cfg, model, h, loader, betas=[1.0])["cost"]
    one = sum(p.numel() for p in model.fine.component(0).parameters())
    assert cost["fine_component_parameters"] == 2 * one  # two stored components, not K = 3
    parts = ("shared_parameters", "coarse_component_parameters", "fine_component_parameters")
    assert cost["hdcnn_parameters"] == sum(cost[k] for k in parts)


@pytest.mark.parametrize("beta", [None, 1.5])
def test_probabilities_are_fp32_and_sum_to_one_under_bf16_autocast(beta: float | None) -> None:
    model = make(sets=SINGLE, sharp=30.0).eval()
    x = torch.randn(32, 1, 8, 8)
    dtypes: dict[str, list[torch.dtype]] = {"threshold": [], "fine": []}
    conditional, forward_one, forward_all = model.conditional_weights, model.fine.forward_one, model.fine.forward_all

    def spy_threshold(coarse: torch.Tensor, b: float) -> torch.Tensor:
        out = conditional(coarse, b)
        dtypes["threshold"] += [coarse.dtype, out.dtype]
        return out

    def spy_one(k: int, h: torch.Tensor) -> torch.Tensor:
        out = forward_one(k, h)
        dtypes["fine"].append(out.dtype)
        return out

    def spy_all(h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        out = forward_all(h, index)
        dtypes["fine"].append(out.dtype)
        return out

    model.conditional_weights = spy_threshold  # type: ignore[method-assign]
    model.fine.forward_one, model.fine.forward_all = spy_one, spy_all  # type: ignore[method-assign]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, beta=beta)
    assert set(dtypes["fine"]) == {torch.bfloat16}  # the layers still run under autocast
    if beta is not None:
        assert dtypes["threshold"] == [torch.float32, torch.float32]  # B_ik >= 1/(beta K) compared in fp32
        assert out["components_run"].float().mean() < 2
    for key in ("probs", "coarse_probs", "fine_probs_coarse"):
        assert out[key].dtype == torch.float32, key
        assert (out[key].sum(1) - 1).abs().max() <= 1e-6, key


def test_training_mode_ignores_beta_and_runs_all() -> None:
    model = make(beta=1.0).train()
    out = model(torch.randn(4, 1, 8, 8))
    assert out["components_run"].tolist() == [3] * 4


def test_fine_component_net_roundtrip_and_frozen_shared() -> None:
    model = make().eval()
    net = model.fine_component_net(2)
    assert isinstance(net, FineComponentNet)
    assert all(not p.requires_grad for p in net.shared.parameters())
    assert all(p.requires_grad for p in model.shared.parameters())  # the model's own stay trainable
    x = torch.randn(3, 1, 8, 8)
    net.eval()
    assert net(x).shape == (3, 3)
    with torch.no_grad():
        for p in net.component.parameters():
            p.add_(1.0)
    net.train()
    assert not net.shared.training  # frozen BN stays in eval mode
    model.load_fine_component(2, net)
    net.eval()
    h = model.shared(x)
    assert torch.allclose(model.fine.forward_one(2, h)[:, :3], net(x), atol=1e-5)


def test_find_classifier_and_block_head_init() -> None:
    name, layer = find_classifier(split_block(TinyBlock(6), "stage1")[1])
    assert name == "head.3" and isinstance(layer, torch.nn.Linear)
    torch.manual_seed(0)
    block = TinyBlock(6)
    model = HDCNN(block, SETS, "stage2", fine_head_init="block")
    w = model.fine.stacked()[0]["head.3.weight"]
    assert torch.equal(w[2, :3], block.head[3].weight[[3, 4, 5]])


def test_bad_inputs() -> None:
    with pytest.raises(ModelError, match="stage1"):  # lists the stages
        HDCNN(TinyBlock(6), SETS, "stage9")
    with pytest.raises(HierarchyError, match="empty"):
        HDCNN(TinyBlock(6), [[0, 1, 2], [], [3, 4, 5]], "stage1")
    with pytest.raises(HierarchyError, match="3 classes"):
        HDCNN(TinyBlock(6), SETS, "stage1", class_names=["a", "b", "c"])
    with pytest.raises(HierarchyError, match="exceeds"):
        HDCNN(TinyBlock(2), [[0], [1], [0, 1]], "stage1")
    with pytest.raises(HierarchyError, match="no partial set"):
        HDCNN(TinyBlock(6), [[0, 1], [2, 3]], "stage1")
    with pytest.raises(HierarchyError, match="outside"):
        HDCNN(TinyBlock(6), [[0, 1, 2], [3, 4, 5, 6]], "stage1")
    with pytest.raises(HierarchyError, match="'zebra'"):
        HDCNN(TinyBlock(3), [["a", "b"], ["zebra"]], "stage1", class_names=["a", "b", "c"])
    with pytest.raises(ModelError, match="fine_exec"):
        HDCNN(TinyBlock(6), SETS, "stage1", fine_exec="threads")


def test_channels_last_matches_and_state_dict_roundtrip() -> None:
    model = make(sharp=5.0).eval()
    x = torch.randn(4, 1, 8, 8)
    ref = model(x)["probs"]
    model.to(memory_format=torch.channels_last)  # the engine does this; stacked conv weights follow
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last))["probs"], ref, atol=1e-5)
    fresh = HDCNN(TinyBlock(6), SETS, "stage1")
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(fresh.eval()(x)["probs"], ref, atol=1e-5)


def test_param_groups_keep_stacked_biases_and_norms_out_of_weight_decay() -> None:
    from coarse2fine.recipes.hdcnn import hdcnn_param_groups

    model = make()
    decay, no_decay = hdcnn_param_groups(model)
    assert no_decay["weight_decay"] == 0.0
    stacked = model.fine.stacked()[0]
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.fine.get_parameter("head__3__bias")) in ids  # (K, S_max) stacked bias
    assert id(model.fine.get_parameter("body__1__weight")) in ids  # (K, C) stacked BN weight
    assert id(model.fine.get_parameter("head__3__weight")) not in ids
    assert stacked["head.3.weight"].dim() == 3
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_compress_hdcnn_quantises_every_part() -> None:
    from coarse2fine.hdcnn import compress_hdcnn

    torch.manual_seed(0)
    model = HDCNN(TinyBlock(6, width=32), SETS, "stage1").eval()
    x = torch.randn(4, 1, 8, 8)
    before = model(x)["probs"]
    fine_w = model.fine.stacked()[0]["body.0.weight"].clone()
    spec = {"shared": {"stem.0": (3, 4)}, "coarse": {"body.0": (4, 8)}, "fine": {"body.0": (4, 8)}}
    report = compress_hdcnn(model, spec)
    assert report["bytes_after"] < report["bytes_before"]
    assert type(model.shared.stem[0]).__name__ == "PQConv2d"
    after_w = model.fine.stacked()[0]["body.0.weight"]
    assert not torch.equal(after_w, fine_w)  # fine components hold the quantised weights
    for k in range(3):  # 8 centres per segment: at most 8 distinct rows-segments per component
        seg = after_w[k].reshape(32, -1)[:, :4]
        assert torch.unique(seg, dim=0).shape[0] <= 8
    after = model(x)["probs"]
    assert torch.allclose(after.sum(1), torch.ones(4), atol=1e-5)
    assert (after - before).abs().max() < 0.5


def test_compress_hdcnn_rear_leaves_shared_layers_and_counts_rear_bytes() -> None:
    from coarse2fine.compress import state_bytes
    from coarse2fine.hdcnn import compress_hdcnn

    torch.manual_seed(0)
    model = HDCNN(TinyBlock(6, width=32), SETS, "stage1").eval()
    shared_before = state_bytes(model.shared)
    rear_before = state_bytes(model.coarse) + state_bytes(model.fine)
    report = compress_hdcnn(model, "rear", axis="columns", conv=(2, 16), min_params=64)
    assert report["shared_layers"] is None and state_bytes(model.shared) == shared_before
    assert all(type(m).__name__ != "PQConv2d" for m in model.shared.modules())
    assert report["rear_bytes_before"] == rear_before
    assert report["rear_bytes_after"] == state_bytes(model.coarse) + state_bytes(model.fine)
    assert report["rear_factor"] == pytest.approx(rear_before / report["rear_bytes_after"])
    assert report["rear_factor"] > 2.0
    assert all(r["axis"] == "columns" for part in report["fine_components"] for r in part["layers"])
    assert report["spec"]["fine.body.0.weight"] == [2, 16, "columns"]
    with pytest.raises(ModelError, match="'rear'"):
        compress_hdcnn(model, "everything")


def test_compressed_fine_components_save_codes_and_load_back() -> None:
    from coarse2fine.compress import apply_compression_structure, state_bytes
    from coarse2fine.hdcnn import compress_hdcnn

    torch.manual_seed(0)
    model = HDCNN(TinyBlock(6, width=32), SETS, "stage1").eval()
    x = torch.randn(4, 1, 8, 8)
    plain = state_bytes(model.fine)
    report = compress_hdcnn(model, {"fine": {"body.0": (4, 8, "columns")}, "coarse": {"body.0": (4, 8)}})
    state = model.state_dict()
    # the stacked fp32 weight is replaced by K uint8 code tables and K centre tables
    assert "fine.body__0__weight" not in state
    assert state["fine.body__0__weight__codes"].dtype == torch.uint8
    assert state["fine.body__0__weight__codes"].shape == (3, 288, 8)  # K, 32*9 columns, 32/4 segments
    assert state["fine.body__0__weight__centers"].shape == (3, 8, 8, 4)
    assert state_bytes(model.fine) < plain - 3 * 32 * 288 * 4 + 3 * (288 * 8 + 8 * 8 * 4 * 4) + 1
    # each component's weight is its own dequantised codes: at most 8 distinct column segments
    w = model.fine.stacked()[0]["body.0.weight"][1].reshape(32, 288)
    assert torch.unique(w[:4].t(), dim=0).shape[0] <= 8
    out = model(x)["probs"]
    fresh = HDCNN(TinyBlock(6, width=32), SETS, "stage1").eval()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)  # codes without the structure do not load
    apply_compression_structure(fresh, report["spec"])
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x)["probs"], out)
    assert torch.equal(fresh.fine.stacked()[0]["body.0.weight"], model.fine.stacked()[0]["body.0.weight"])
    with pytest.raises(ModelError, match=r"no weight named 'body\.9\.weight'"):
        fresh.fine.apply_pq_structure("body.9.weight", 4, 8)


def test_default_beta_and_explicit_none() -> None:
    model = make(beta=1.0, sharp=30.0).eval()
    x = torch.randn(8, 1, 8, 8)
    assert model(x)["components_run"].float().mean() < 3  # self.beta routes
    assert model(x, beta=None)["components_run"].tolist() == [3] * 8  # None: every component

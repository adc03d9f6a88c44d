"""Building blocks: VGG configurations, dense conversion, init, NIN, timm wrapper, factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coarse2fine.errors import ModelError
from coarse2fine.models import (
    NIN,
    VGG,
    create_model,
    init_from_shallower,
    list_models,
    load_pretrained_file,
    model_summary,
    reset_last_layer,
)
from helpers.models import tiny_swin

PAPER = ["vgg11", "vgg11_lrn", "vgg13", "vgg16_c", "vgg16", "vgg19"]
CONVS_PER_STAGE = {
    "vgg11": [1, 1, 2, 2, 2],
    "vgg11_lrn": [1, 1, 2, 2, 2],
    "vgg13": [2, 2, 2, 2, 2],
    "vgg16_c": [2, 2, 3, 3, 3],
    "vgg16": [2, 2, 3, 3, 3],
    "vgg19": [2, 2, 4, 4, 4],
}


def small(name: str, num_classes: int = 5, width_mult: float = 0.125, **kw) -> VGG:
    """A paper configuration for 32x32 inputs, 1/8 of the widths, a narrow head (fast to run)."""
    torch.manual_seed(0)
    return create_model(
        name, num_classes=num_classes, input_size=32, hidden=(16, 16), width_mult=width_mult, **kw
    ).eval()


@pytest.mark.parametrize("name", [*PAPER, *(n + "_bn" for n in PAPER)])
def test_vgg_stages_and_shapes(name: str) -> None:
    with torch.device("meta"):  # full widths, no memory
        model = small(name, width_mult=1.0)
        x = torch.randn(2, 3, 32, 32)
    outs = model.forward_stages(x)
    assert [o.shape[1:] for o in outs] == [
        (c, 32 // r, 32 // r) for c, r in [(64, 2), (128, 4), (256, 8), (512, 16), (512, 32)]
    ]
    assert [s.name for s in model.feature_info] == [f"stage{i}" for i in range(1, 6)]
    assert [s.reduction for s in model.feature_info] == [2, 4, 8, 16, 32]
    assert model(x).shape == (2, 5)
    convs = [sum(isinstance(m, nn.Conv2d) for m in getattr(model, f"stage{i}")) for i in range(1, 6)]
    assert convs == CONVS_PER_STAGE[name.removesuffix("_bn")]
    for i in range(1, 6):
        kinds = [type(m) for m in getattr(model, f"stage{i}")]
        assert kinds.count(nn.MaxPool2d) == 1
        lrn_last = "lrn" in name and i == 1  # A-LRN stage 1: conv, relu, lrn, pool (LRN does not commute)
        assert kinds[-1:] == [nn.MaxPool2d] if lrn_last else kinds[-2:] == [nn.MaxPool2d, nn.ReLU]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == name.endswith("_bn")
    assert any(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) == ("lrn" in name)
    if name.startswith("vgg16_c"):
        assert [m.kernel_size for m in model.stage3 if isinstance(m, nn.Conv2d)] == [(3, 3), (3, 3), (1, 1)]


def test_paper_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        counts = {n: create_model(n).num_parameters() for n in ["vgg16", "vgg11", "vgg19"]}
    assert counts == {"vgg16": 138_357_544, "vgg11": 132_863_336, "vgg19": 143_667_240}


def test_head_is_sized_to_final_map_without_adaptive_pool() -> None:
    with torch.device("meta"):
        model = create_model("vgg16")
    assert model.head.fc1.in_features == 512 * 7 * 7
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    with pytest.raises(ModelError, match="final map"):
        small("vgg11")(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["vgg11_lrn", "vgg16_c_bn", "vgg_small_bn"])
def test_dense_equals_fc_at_training_size(name: str) -> None:
    model = small(name) if name != "vgg_small_bn" else create_model(name, 10, in_chans=1).eval()
    c, h, w = model.default_input_size
    x = torch.randn(3, c, h, w)
    dense = model.to_dense().eval()
    scores = dense(x)
    assert scores.shape == (3, model.num_classes, 1, 1)
    torch.testing.assert_close(scores.mean((2, 3)), model(x), atol=1e-5, rtol=1e-5)
    bigger = dense(torch.randn(2, c, h + 2 * 16 + 3, w + 40))
    assert bigger.shape[:2] == (2, model.num_classes) and bigger.shape[2] > 1 and bigger.shape[3] > 1
    with pytest.raises(ModelError, match="at least"):
        dense(torch.randn(1, c, h - 8, w))


@pytest.mark.parametrize("name,stage", [("vgg16_bn", "stage4"), ("vgg11", "stage2"), ("vgg_small_bn", "stage1")])
def test_vgg_split_composes_to_forward(name: str, stage: str) -> None:
    model = small(name) if name != "vgg_small_bn" else create_model(name, 10, in_chans=1).eval()
    x = torch.randn(2, *model.default_input_size)
    pre, rear = model.split(stage)
    torch.testing.assert_close(rear(pre(x)), model(x))
    assert list(pre.named_children())[-1][0] == stage
    assert next(pre.parameters()) is next(model.parameters())  # shared, not copied


def test_small_variants_shapes_and_flops() -> None:
    for name in ["vgg_small", "vgg_small_bn", "vgg_small_fast", "vgg_small_fast_bn", "vgg16_small", "vgg16_small_bn"]:
        for chans, size in [(1, 28), (3, 32)]:
            with torch.device("meta"):
                model = create_model(name, 10, in_chans=chans).eval()
                assert model(torch.randn(2, chans, size, size)).shape == (2, 10)
            assert model.default_input_size == (chans, size, size)
    fm = model_summary("vgg_small_bn", 10, 1)
    assert fm["input_size"] == (1, 28, 28)
    assert 20e6 <= fm["flops"] <= 60e6, fm  # the Fashion-MNIST budget (module docstring)
    assert model_summary("vgg16_small_bn", 10, 3)["flops"] > 5 * fm["flops"]
    with torch.device("meta"):
        fast = create_model("vgg_small_fast_bn", 10, in_chans=1)
    widths = [[m.out_channels for m in getattr(fast, f"stage{i}") if isinstance(m, nn.Conv2d)] for i in (1, 2, 3)]
    assert widths == [[16], [64, 64], [128, 128]] and fast.final_map == (128, 3, 3)
    # 28*28*16*9 + 14*14*(16*64 + 64*64)*9 + 7*7*(64*128 + 128*128)*9 + 1152*256 + 256*10 multiply-adds
    macs = 28 * 28 * 16 * 9 + 14 * 14 * (16 * 64 + 64 * 64) * 9 + 7 * 7 * (64 * 128 + 128 * 128) * 9 + 1152 * 256 + 2560
    assert model_summary("vgg_small_fast_bn", 10, 1)["flops"] == 2 * macs


def test_init_schemes() -> None:
    paper = small("vgg11", init="paper")
    w = torch.cat([m.weight.flatten() for m in paper.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 0.1) < 0.01  # N(0, variance 1e-2)
    assert all(m.bias.abs().sum() == 0 for m in paper.modules() if isinstance(m, nn.Conv2d))
    glorot = small("vgg11", init="glorot")
    fc = glorot.head.fc1
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound
    assert small("vgg11_bn").init == "kaiming"
    with pytest.raises(ModelError, match="unknown init"):
        create_model("vgg11", init="xavierish")


def test_init_from_shallower_copies_first_four_convs_and_fcs() -> None:
    a = small("vgg11")
    d = small("vgg16_bn")
    before = {k: v.clone() for k, v in d.state_dict().items()}
    names = init_from_shallower(d, a.state_dict())
    convs = ["stage1.conv1", "stage2.conv1", "stage3.conv1", "stage3.conv2"]
    fcs = ["head.fc1", "head.fc2", "head.fc3"]
    assert names == [f"{n}.{p}" for n in convs + fcs for p in ("weight", "bias")]
    sd = d.state_dict()
    for key in names:
        assert torch.equal(sd[key], a.state_dict()[key])
    for key in ["stage1.conv2.weight", "stage3.conv3.weight", "stage4.conv1.weight", "stage1.bn1.weight"]:
        assert torch.equal(sd[key], before[key])
    other = small("vgg11", num_classes=7)
    with pytest.raises(ModelError, match=r"head\.fc3\.weight"):
        init_from_shallower(d, other.state_dict())
    with pytest.raises(ModelError, match=r"no 'head\.fc1\.weight'"):
        init_from_shallower(d, {k: v for k, v in a.state_dict().items() if not k.startswith("head.fc1")})


def test_reset_classifier_and_last_layer() -> None:
    model = small("vgg13")
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    _, rear = model.split("stage4")
    reset_last_layer(rear, 2)
    assert rear(torch.randn(1, 64, 2, 2)).shape == (1, 2)
    assert model.num_classes == 3 and model.head.fc3.out_features == 2  # rear shares the head


def test_nin_layers_stages_split_dense() -> None:
    torch.manual_seed(0)
    model = create_model("nin", 10).eval()
    assert isinstance(model, NIN)
    kernels = [m.kernel_size[0] for m in model.modules() if isinstance(m, nn.Conv2d)]
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [5, 1, 1, 5, 1, 1, 3, 1, 1]
    assert widths == [192, 160, 96, 192, 192, 192, 192, 192, 10]
    assert model.stage_shapes() == [(96, 16, 16), (192, 8, 8), (192, 8, 8)]
    x = torch.randn(2, 3, 32, 32)
    pre, rear = model.split("stage1")
    assert isinstance(list(pre)[-1][-1], nn.MaxPool2d)  # shared layers end with pool1
    torch.testing.assert_close(rear(pre(x)), model(x))
    torch.testing.assert_close(model.to_dense()(x).mean((2, 3)), model(x))
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)


def test_timm_resnet18_contract() -> None:
    torch.manual_seed(0)
    model = create_model("timm/resnet18", 6).eval()
    assert [s.reduction for s in model.feature_info] == [2, 4, 8, 16, 32]
    assert [s.channels for s in model.feature_info] == [64, 64, 128, 256, 512]
    x = torch.randn(2, 3, 64, 64)
    outs = model.forward_stages(x)
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    pre, rear = model.split("stage3")
    torch.testing.assert_close(rear(pre(x)), model(x))
    assert [n for n, _ in model.sequence()][-1] == "head"
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name,stages", [("timm/efficientnet_b0", 5), ("timm/convnext_atto", 4)])
def test_timm_sequence_composes_for_other_families(name: str, stages: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, 4).eval()
    x = torch.randn(1, 3, 32, 32)
    assert len(model.forward_stages(x)) == len(model.feature_info) == stages
    names = [n for n, _ in model.sequence()]
    assert all(s.module in names for s in model.feature_info) and "." not in "".join(names)
    pre, rear = model.split(model.feature_info[-2].name)
    torch.testing.assert_close(rear(pre(x)), model(x))


def test_timm_swin_tokens_and_errors() -> None:
    model = tiny_swin(32).eval()
    assert model.token_layout == "nlc" and model.default_input_size == (3, 32, 32)
    outs = model.forward_stages(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 24), (2, 16, 48), (2, 4, 96), (2, 1, 192)]
    x = torch.randn(2, 3, 32, 32)
    pre, rear = model.split("stage2")
    torch.testing.assert_close(rear(pre(x)), model(x))
    vit = create_model("timm/vit_tiny_patch16_224", 5, img_size=32, depth=1)
    with pytest.raises(ModelError, match="cannot be split"):
        vit.sequence()


def test_factory_errors_and_listing() -> None:
    assert {"vgg16", "vgg16_c_bn", "vgg_small_bn", "vgg16_small_bn", "nin"} <= set(list_models())
    with pytest.raises(ModelError, match="vgg16"):
        create_model("vgg61")
    with pytest.raises(ModelError, match="close matches: timm/resnet18"):
        create_model("timm/resnet18x")
    with pytest.raises(ModelError, match="bad keyword"):
        create_model("vgg_small", 10, in_chans=1, bogus=1)


def test_load_pretrained_file(tmp_path) -> None:
    from safetensors.torch import save_file

    src = create_model("vgg_small_bn", 10, in_chans=1)
    st = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(st))
    pt = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, pt)
    for path in (st, pt):
        dst = create_model("vgg_small_bn", 10, in_chans=1, init="paper")
        info = load_pretrained_file(dst, path)
        assert not info["skipped"] and not info["missing"]
        for k, v in dst.state_dict().items():
            assert torch.equal(v, src.state_dict()[k]), k
    other = create_model("vgg_small_bn", 4, in_chans=1)
    info = load_pretrained_file(other, st)  # class count differs: head skipped
    assert info["skipped"] == ["head.fc2.bias", "head.fc2.weight"]
    assert torch.equal(other.stage1.conv1.weight, src.stage1.conv1.weight)
    with pytest.raises(ModelError, match=r"w\.safetensors.*head\.fc2\.weight"):
        load_pretrained_file(create_model("vgg_small_bn", 4, in_chans=1), st, skip_head=False)
    with pytest.raises(ModelError, match=r"w\.safetensors.*stage1\.conv1\.weight"):
        load_pretrained_file(create_model("vgg_small_bn", 10, in_chans=3, input_size=28), st)
    with pytest.raises(ModelError, match=r"unexpected keys .*bn1"):
        load_pretrained_file(create_model("vgg_small", 10, in_chans=1), st)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"bad\.pt"):
        load_pretrained_file(src, bad)


def test_relu_after_pool_equals_relu_before_pool() -> None:
    """The stage puts its last ReLU after the pool: same outputs and gradients as the usual order."""
    torch.manual_seed(0)
    model = create_model("vgg_small_bn", num_classes=4, in_chans=1).train()
    stage = model.stage1
    assert list(stage._modules)[-2:] == ["pool", "relu2"]
    usual = nn.Sequential(*(stage._modules[k] for k in ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool"]))
    x = torch.randn(6, 1, 28, 28)
    outs, grads = [], []
    for net in (stage, usual):
        net.zero_grad()
        y = net(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append(stage.conv1.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])

"""VGG test protocols (METHODS.md §1 Testing): view counts, scales, dense, fusion, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from coarse2fine.engine.protocols import (
    PROTOCOLS,
    Fusion,
    default_scales,
    default_test_scale,
    evaluate_protocol,
    predict_views,
    resize_shortest,
)
from coarse2fine.errors import ConfigError, ModelError
from coarse2fine.models import create_model


def tiny_vgg(seed: int = 0, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vgg_small_bn", classes, in_chans=1, width_mult=0.25, hidden=(8,)).eval()


class Counting(nn.Module):
    """Records the batch shapes it sees; logits from the mean pixel (no to_dense)."""

    def __init__(self, crop: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.default_input_size = (1, crop, crop)
        self.lin = nn.Linear(1, classes)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(tuple(x.shape))
        return self.lin(x.mean((1, 2, 3))[:, None])


def batches(n: int = 6, size: int = 28, bs: int = 4, uint8: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 4
    return [(x[i : i + bs] if uint8 else x[i : i + bs].float() / 255, y[i : i + bs]) for i in range(0, n, bs)]


def test_default_scales() -> None:
    assert default_scales(224, [256]) == [224, 256, 288]
    assert default_scales(224, [256, 512]) == [256, 384, 512]
    assert default_test_scale(224, [256, 512]) == 384 and default_test_scale(224, [384]) == 384
    assert default_scales(28) == [28, 31, 34] and default_test_scale(28) == 28
    assert default_scales(32) == [32, 36, 40]


def test_resize_shortest_keeps_aspect() -> None:
    x = torch.rand(2, 3, 30, 60)
    assert resize_shortest(x, 15).shape == (2, 3, 15, 30)
    assert resize_shortest(x.transpose(2, 3), 45).shape == (2, 3, 90, 45)


@pytest.mark.parametrize(
    "protocol,flip,views,calls",
    [
        ("center", False, 1, [(4, 1, 8, 8)]),
        ("center", True, 2, [(8, 1, 8, 8)]),
        ("multicrop", True, 50 * 3, [(200, 1, 8, 8)] * 3),
        ("multicrop", False, 25 * 3, [(100, 1, 8, 8)] * 3),
        ("multiscale", True, 2 * 3, [(8, 1, 8, 8)] * 3),  # no to_dense: centre crops per scale
    ],
)
def test_view_counts_and_shapes(protocol: str, flip: bool, views: int, calls: list) -> None:
    model = Counting()
    probs, n = predict_views(model, torch.rand(4, 1, 10, 12), protocol, flip=flip)
    assert n == views and probs.shape == (4, 3)
    assert model.seen == calls
    torch.testing.assert_close(probs.sum(1), torch.ones(4))


def test_multicrop_grid_covers_corners() -> None:
    """5x5 positions run from the top-left to the bottom-right corner of the resized image."""
    img = torch.zeros(1, 1, 8, 12)
    img[..., 0, 0], img[..., -1, -1] = 1.0, 2.0

    class Probe(Counting):
        def forward(self, x: Tensor) -> Tensor:
            self.seen.append((x[:, 0, 0, 0].tolist(), x[:, 0, -1, -1].tolist()))
            return self.lin(x.mean((1, 2, 3))[:, None])

    model = Probe(crop=4)
    predict_views(model, img, "multicrop", scales=[8], flip=False)
    top_left, bottom_right = model.seen[0]
    assert top_left == [1.0] + [0.0] * 24
    assert bottom_right == [0.0] * 24 + [2.0]


def test_dense_protocol_matches_fc_and_handles_any_size() -> None:
    model = tiny_vgg()
    x = torch.rand(3, 1, 28, 28)
    probs, n = predict_views(model, x, "dense", flip=False)
    assert n == 1
    torch.testing.assert_close(probs, model(x).softmax(1), atol=1e-5, rtol=1e-5)
    flipped, n = predict_views(model, x, "dense", flip=True)
    assert n == 2
    torch.testing.assert_close(flipped, (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2, atol=1e-5, rtol=1e-5)
    # non-square images of two sizes in one batch: grouped by size, order kept
    images = [torch.rand(1, 28, 40), torch.rand(1, 36, 28), torch.rand(1, 28, 40)]
    probs, n = predict_views(model, images, "multiscale")
    assert probs.shape == (3, 4) and n == 6
    alone, _ = predict_views(model, images[1:2], "multiscale")
    torch.testing.assert_close(probs[1:2], alone)


def test_dense_plus_multicrop_is_mean_of_both() -> None:
    model = tiny_vgg()
    x = torch.rand(2, 1, 30, 30)
    dense, nd = predict_views(model, x, "dense", scales=[28, 31])
    crops, nc = predict_views(model, x, "multicrop", scales=[28, 31])
    both, n = predict_views(model, x, "dense+multicrop", scales=[28, 31])
    assert (nd, nc, n) == (4, 100, 104)
    torch.testing.assert_close(both, (dense + crops) / 2)
    chunked, _ = predict_views(model, x, "multicrop", scales=[28, 31], max_batch=3)  # views in small chunks
    torch.testing.assert_close(chunked, crops)


def test_fusion_averages_models_of_different_architectures() -> None:
    a, b = tiny_vgg(0), create_model("vgg_small", 4, in_chans=1, width_mult=0.25, hidden=(8,)).eval()
    x = torch.rand(2, 1, 28, 28)
    pa, _ = predict_views(a, x, "center")
    pb, _ = predict_views(b, x, "center")
    fused, n = predict_views([a, b], x, "center")
    assert n == 2
    torch.testing.assert_close(fused, (pa + pb) / 2)


def test_dict_outputs_are_accepted() -> None:
    """Models whose output is a dict (HD-CNN, HERBS) are read through its "logits"."""

    class DictOut(Counting):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": super().forward(x), "extra": x}

    plain, wrapped = Counting(), DictOut()
    wrapped.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 9, 9)
    torch.testing.assert_close(predict_views(wrapped, x, "multicrop")[0], predict_views(plain, x, "multicrop")[0])


def test_evaluate_protocol_over_a_loader_with_uint8_and_normalisation() -> None:
    model = tiny_vgg()
    model.train()
    data = batches(uint8=True)
    res = evaluate_protocol(model, data, "multicrop", mean=[0.5], std=[0.25], scales=[28, 31])
    assert model.training  # restored
    assert res.probs.shape == (6, 4) and res.views == 100
    np.testing.assert_array_equal(res.targets, np.arange(6) % 4)
    manual = torch.cat(
        [predict_views(model, (x.float() / 255 - 0.5) / 0.25, "multicrop", scales=[28, 31])[0] for x, _ in data]
    )
    np.testing.assert_allclose(res.probs, manual.numpy(), atol=1e-5)
    for protocol in PROTOCOLS:
        out = evaluate_protocol(model, batches(), protocol, flip=False, scales=[28, 30])
        assert out.probs.shape == (6, 4)
        np.testing.assert_allclose(out.probs.sum(1), 1.0, atol=1e-5)


def test_protocol_errors() -> None:
    model = tiny_vgg()
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(ConfigError, match="valid: center, dense"):
        predict_views(model, x, "tencrop")
    with pytest.raises(ConfigError, match="smaller than the crop"):
        predict_views(model, x, "multicrop", scales=[20, 28])
    with pytest.raises(ModelError, match="to_dense"):
        predict_views(Counting(), torch.rand(1, 1, 8, 8), "dense")


def test_fusion_module_is_the_log_of_the_mean_softmax() -> None:
    """eq. (4) as one model: its softmax is the mean of the members' softmax; dict outputs count by "logits"."""

    class DictOut(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": self.m(x), "other": x}

    a, b = tiny_vgg(0), tiny_vgg(1)
    x = batches()[0][0]
    with torch.inference_mode():
        fused = Fusion(a, DictOut(b))(x)
        expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    torch.testing.assert_close(torch.softmax(fused, 1), expected)
    assert not torch.allclose(expected, torch.softmax(a(x), 1))
    with pytest.raises(ModelError):
        Fusion()

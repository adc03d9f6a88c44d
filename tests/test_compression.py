"""Product-quantisation compression (METHODS.md §2.4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from coarse2fine.compress import (
    CompressionReport,
    PQConv2d,
    PQLinear,
    apply_compression_structure,
    auto_spec,
    compress_model,
    compression_factor,
    parse_layer_spec,
    product_quantize,
    reconstruct,
    relative_error,
)
from coarse2fine.errors import C2FError, ModelError


def test_compression_factor_matches_the_paper() -> None:
    # computed on shapes only: VGG fc6 (4096 x 25088) s=14 k=64 and fc7 (4096 x 4096) s=4 k=256
    assert compression_factor(4096, 25088, 14, 64) == pytest.approx(29.87, abs=0.01)
    assert compression_factor(4096, 4096, 4, 256) == pytest.approx(8.0)
    # by hand: m=8, n=4, s=2, k=2 -> 32*32 / (32*2*4 + 8*32/2) = 1024 / 384
    assert compression_factor(8, 4, 2, 2) == pytest.approx(1024 / 384)


def test_shapes_dtypes_and_padding() -> None:
    torch.manual_seed(0)
    W = torch.randn(40, 10)
    codes, centers = product_quantize(W, 4, 8)  # 10 columns -> padded to 12 (3 segments)
    assert codes.dtype == torch.uint8 and codes.shape == (40, 3)
    assert centers.dtype == torch.float32 and centers.shape == (3, 8, 4)
    assert int(codes.max()) < 8
    assert reconstruct(codes, centers).shape == (40, 12)
    W_hat = reconstruct(codes, centers, 10)
    assert W_hat.shape == (40, 10)
    # each reconstructed row-segment is one of that segment's centres
    g = 1
    seg = W_hat[:, g * 4 : (g + 1) * 4]
    assert torch.equal(seg, centers[g][codes[:, g].long()])


def test_error_falls_as_k_rises_and_is_exact_with_enough_centres() -> None:
    torch.manual_seed(0)
    W = torch.randn(64, 24)
    errors = [relative_error(W, reconstruct(*product_quantize(W, 3, k, seed=0), 24)) for k in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2] > 0.0
    # k >= number of distinct rows: exact (here k clipped to the 64 rows)
    assert relative_error(W, reconstruct(*product_quantize(W, 3, 64), 24)) == 0.0
    codes, centers = product_quantize(W, 3, 200)
    assert centers.shape[1] == 64
    assert torch.equal(reconstruct(codes, centers, 24), W)
    # few distinct rows, many rows: exact with k = distinct rows
    V = torch.randn(5, 12)[torch.randint(0, 5, (100,))]
    assert torch.equal(reconstruct(*product_quantize(V, 4, 5), 12), V)


def test_conv_weight_is_flattened() -> None:
    torch.manual_seed(0)
    W = torch.randn(16, 3, 3, 3)
    codes, centers = product_quantize(W, 3, 4)
    assert codes.shape == (16, 9) and centers.shape == (9, 4, 3)


def test_bad_arguments_are_clear_errors() -> None:
    W = torch.randn(8, 8)
    with pytest.raises(ModelError, match="uint8"):
        product_quantize(W, 2, 300)
    with pytest.raises(ModelError, match="segment width"):
        product_quantize(W, 0, 4)
    with pytest.raises(ModelError, match="number of centres"):
        product_quantize(W, 2, 0)
    with pytest.raises(ModelError, match="matrix"):
        product_quantize(torch.randn(8), 2, 2)
    with pytest.raises(C2FError, match="NAME=S:K"):
        parse_layer_spec(["fc6:14:64"])
    assert parse_layer_spec(["fc6=14:64", "a.b=4:256"]) == {"fc6": (14, 64), "a.b": (4, 256)}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


LAYER_SPEC = {"features.0": (3, 32), "features.2": (3, 32), "classifier.1": (4, 96)}  # exact: k = rows


def test_exact_compression_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(3, 3, 8, 8)
    before = model(x)
    report = compress_model(model, LAYER_SPEC)
    assert isinstance(model.features[0], PQConv2d) and isinstance(model.classifier[1], PQLinear)
    assert isinstance(model.classifier[3], nn.Linear)  # not named: untouched
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert all(r.rel_error == 0.0 for r in report.layers)


def test_lossy_compression_stays_close_and_reports() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    spec = {"features.2": (3, 16), "classifier.1": (2, 24)}
    report = compress_model(model, spec)
    with torch.no_grad():
        after = model(x)
    rel = float((after - before).norm() / before.norm())
    assert 0.0 < rel < 0.25
    r = {x.name: x for x in report.layers}["classifier.1"]
    assert (r.m, r.n, r.s, r.k, r.shape) == (96, 128, 2, 24, [96, 128])
    assert r.bytes_before == 96 * 128 * 4
    assert r.bytes_after == 96 * 64 * 1 + 64 * 24 * 2 * 4  # uint8 codes + fp32 centres
    assert r.factor == pytest.approx(compression_factor(96, 128, 2, 24))
    assert 0.0 < r.rel_error < 1.0
    assert report.model_bytes_after < report.model_bytes_before
    assert "classifier.1" in report.table() and "**model**" in report.table()
    assert report.to_dict()["layers"][0]["name"] == "features.2"


def test_eval_cache_and_train_mode() -> None:
    torch.manual_seed(0)
    model = Tiny()
    compress_model(model, {"classifier.1": (4, 8)})
    layer = model.classifier[1]
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    cached = layer._cached
    assert cached is not None
    model(x)
    assert layer._cached is cached  # reused
    model.train()
    assert layer._cached is None
    out = model(x)
    out.sum().backward()
    assert layer.bias.grad is not None  # bias still trains; codes and centres are buffers


def test_save_load_round_trip_with_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    report = compress_model(model, {"features.2": (3, 16), "classifier.1": (4, 24)})
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    path = tmp_path / "compressed.pt"
    torch.save({"model": model.state_dict(), "compression": report.spec()}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model"]["classifier.1.codes"].dtype == torch.uint8
    fresh = Tiny()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(ckpt["model"])  # plain structure does not fit
    apply_compression_structure(fresh, ckpt["compression"]).eval()
    fresh.load_state_dict(ckpt["model"])
    assert torch.equal(fresh(x), out)
    # a report (or its dict) rebuilds the structure too
    other = apply_compression_structure(Tiny(), report.to_dict())
    other.load_state_dict(ckpt["model"])
    # the compressed state dict is smaller on disk than the plain one
    torch.save(Tiny().state_dict(), tmp_path / "plain.pt")
    assert path.stat().st_size < (tmp_path / "plain.pt").stat().st_size


def test_spec_errors_name_the_layer() -> None:
    model = Tiny()
    with pytest.raises(ModelError, match="no layer named 'fc9'"):
        compress_model(model, {"fc9": (4, 8)})
    with pytest.raises(ModelError, match="'pool' is a AdaptiveAvgPool2d"):
        compress_model(model, {"pool": (4, 8)})
    with pytest.raises(ModelError, match="uint8"):
        compress_model(model, {"classifier.1": (4, 1000)})
    with pytest.raises(ModelError, match="no layer to compress"):
        compress_model(nn.Sequential(nn.Linear(4, 2)), "auto")


def test_auto_rule() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.Conv2d(16, 64, 3), nn.Conv2d(64, 256, 1), nn.Linear(16, 4))
    spec = auto_spec(model)
    assert set(spec) == {"0", "1"}  # 1x1 conv and the tiny layer are left alone
    assert spec["0"] == (4, 64)  # linear: k = a quarter of the 256 rows
    assert spec["1"] == (3, 43)  # conv: k = two thirds of the 64 rows
    assert all(
        compression_factor(*model[int(n)].weight.reshape(model[int(n)].weight.shape[0], -1).shape, *spec[n]) >= 1.3
        for n in spec
    )
    report = compress_model(model)  # default spec = auto
    assert isinstance(report, CompressionReport) and [r.name for r in report.layers] == ["0", "1"]


def test_torch_backend_matches_sklearn_quality() -> None:
    torch.manual_seed(0)
    W = torch.randn(96, 32)
    errs = {}
    for backend in ("sklearn", "torch"):
        codes, centers = product_quantize(W, 4, 16, seed=0, backend=backend)
        assert codes.dtype == torch.uint8 and codes.shape == (96, 8) and centers.shape == (8, 16, 4)
        errs[backend] = relative_error(W, reconstruct(codes, centers, 32))
    assert errs["torch"] < 1.2 * errs["sklearn"]
    torch_errors = [relative_error(W, reconstruct(*product_quantize(W, 4, k, backend="torch"), 32)) for k in (2, 8, 32)]
    assert torch_errors[0] > torch_errors[1] > torch_errors[2] > 0.0
    V = torch.randn(6, 10)[torch.randint(0, 6, (50,))]
    assert torch.equal(reconstruct(*product_quantize(V, 3, 6, backend="torch"), 10), V)
    with pytest.raises(ModelError, match="unknown backend"):
        product_quantize(W, 4, 16, backend="faiss")
    model = Tiny().eval()
    report = compress_model(model, {"classifier.1": (4, 24)}, backend="torch")
    assert 0.0 < report.layers[0].rel_error < 1.0


def test_cache_from_inference_mode_is_not_used_by_autograd() -> None:
    torch.manual_seed(0)
    model = Tiny()
    compress_model(model, {"classifier.1": (4, 8)})
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        ref = model(x)
    xg = x.clone().requires_grad_(True)
    out = model(xg)  # eval, grad-enabled: must not reuse the inference-mode cache
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(out.detach(), ref)


def test_columns_axis_quantises_the_transpose() -> None:
    """axis="columns": PQ of W^T (segments of s rows, k-means on the n columns); factor with m, n swapped."""
    torch.manual_seed(0)
    assert compression_factor(96, 864, 4, 64, "columns") == pytest.approx(compression_factor(864, 96, 4, 64))
    assert compression_factor(96, 864, 4, 64, "columns") > 4.0 > compression_factor(96, 864, 4, 64)
    model = Tiny().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    # conv 32 x 27 and linear 96 x 128: exact when k covers every column
    exact_spec = {"features.0": (4, 27, "columns"), "classifier.1": (3, 128, "columns")}
    exact = compress_model(copy.deepcopy(model), exact_spec)
    assert all(r.rel_error == 0.0 and r.axis == "columns" for r in exact.layers)
    r = {x.name: x for x in exact.layers}["features.0"]
    assert (r.m, r.n, r.padded_n) == (32, 27, 32)
    lossy = copy.deepcopy(model)
    report = compress_model(lossy, {"features.2": (4, 32, "columns"), "classifier.1": (3, 16, "columns")})
    layer = lossy.classifier[1]
    assert layer.codes.shape == (128, 32) and layer.centers.shape == (32, 16, 3)  # 96 rows padded to 96 = 32 x 3
    assert layer.weight.shape == (96, 128)
    r = {x.name: x for x in report.layers}["classifier.1"]
    assert r.bytes_after == 128 * 32 + 32 * 16 * 3 * 4
    assert r.factor == pytest.approx(compression_factor(96, 128, 3, 16, "columns"))
    # every reconstructed column segment is one of that segment's centres
    w = layer.weight.detach()
    torch.testing.assert_close(w[3:6, 7], layer.centers[1, int(layer.codes[7, 1])])
    with torch.no_grad():
        after = lossy(x)
    assert 0.0 < float((after - before).norm() / before.norm()) < 0.5
    # the spec keeps the axis and rebuilds the structure
    assert report.spec()["classifier.1"] == [3, 16, "columns"]
    fresh = apply_compression_structure(Tiny(), report.spec()).eval()
    fresh.load_state_dict(lossy.state_dict())
    torch.testing.assert_close(fresh(x), lossy(x))
    with pytest.raises(ModelError, match="axis must be one of"):
        compress_model(Tiny(), {"classifier.1": (3, 16, "diagonal")})
    assert parse_layer_spec(["a=4:16:columns"]) == {"a": (4, 16, "columns")}
    with pytest.raises(C2FError, match="AXIS"):
        parse_layer_spec(["a=4:16:sideways"])


def test_auto_rule_picks_the_longer_side() -> None:
    model = nn.Sequential(nn.Linear(864, 96), nn.Linear(96, 864))
    spec = auto_spec(model, axis="auto")
    assert spec["0"] == (4, 216, "columns")  # 864 columns > 96 rows: k = a quarter of the columns
    assert spec["1"] == (4, 216)  # 864 rows: the row orientation

"""``explain_image`` / ``load_image`` (HERBS pictures) and the ``c2f explain`` command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coarse2fine.config import HERBSConfig
from coarse2fine.errors import DataError, ModelError
from coarse2fine.herbs import build_herbs
from coarse2fine.herbs.explain import class_activation, explain_image, explain_panels, load_image, stage_map
from helpers.models import NUM_CLASSES, TinyCNN, TinyTokens

CLASSES = [f"class{i}" for i in range(NUM_CLASSES)]


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make", [TinyCNN, TinyTokens], ids=["cnn", "tokens"])
def test_explain_image_writes_png(tmp_path, make) -> None:
    torch.manual_seed(0)
    model, _ = build_herbs(make(), NUM_CLASSES, HERBSConfig(fpn_size=16), input_size=32)
    image = torch.randn(model.input_size[0], 32, 32)
    out = tmp_path / "sub" / "one.png"
    top = explain_image(model, image, CLASSES, out)
    assert _is_png(out)
    assert model.training  # mode restored
    model.eval()
    assert [c for c, _ in top] == [CLASSES[i] for i in model(image[None])["logits"][0].topk(5).indices]
    assert abs(sum(p for _, p in top) - 1.0) < 1e-4  # 5 classes: the top-5 hold everything
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_explain_bad_inputs(tmp_path) -> None:
    model, _ = build_herbs(TinyCNN(), NUM_CLASSES, HERBSConfig(fpn_size=16), input_size=32)
    with pytest.raises(ModelError, match="class names"):
        explain_image(model, torch.randn(1, 32, 32), CLASSES[:3], tmp_path / "x.png")
    with pytest.raises(DataError):
        explain_image(model, torch.randn(2, 1, 32, 32), CLASSES, tmp_path / "x.png")
    with pytest.raises(ModelError, match="HERBS"):
        explain_image(TinyCNN(), torch.randn(1, 32, 32), CLASSES, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_class_activation_peaks_where_the_class_logit_is_high() -> None:
    maps = torch.zeros(16, 3)
    maps[5, 2] = 4.0  # token (1, 1) of a 4 x 4 grid
    cam = class_activation([maps, torch.zeros(4, 3)], [(4, 4), None], 2, (16, 16))
    assert cam.shape == (16, 16)
    y, x = divmod(int(cam.argmax()), 16)
    assert 4 <= y < 8 and 4 <= x < 8


def test_stage_map_places_tokens_at_their_stride() -> None:
    """Token (i, j) at stride r covers pixels [i r, (i + 1) r) x [j r, (j + 1) r); nothing else is drawn."""
    m = stage_map(torch.arange(9.0), (3, 3), (28, 28), "nearest", 8)
    assert m[:24, :24].isfinite().all() and m[24:].isnan().all() and m[:, 24:].isnan().all()
    for i in range(3):
        for j in range(3):
            assert (m[8 * i : 8 * i + 8, 8 * j : 8 * j + 8] == 3 * i + j).all()
    clipped = stage_map(torch.arange(16.0), (4, 4), (28, 28), "nearest", 8)  # covers 32 px: cut at 28
    assert clipped.isfinite().all() and (clipped[24:, 24:] == 15).all()
    smooth = stage_map(torch.arange(9.0), (3, 3), (28, 28), "bilinear", 8)
    assert smooth[:24, :24].isfinite().all() and smooth[24:].isnan().all()
    assert smooth[4, 4] < 0.5 and smooth[20, 20] == 8  # about the tokens' values at their centres (4, 20)
    assert stage_map(torch.arange(9.0), (3, 3), (28, 28), "nearest").isfinite().all()  # no stride: stretched


def test_explain_overlay_covers_what_each_stage_sees() -> None:
    """vgg_small_bn at 28 px: stage3 is a 3 x 3 grid at stride 8, so its tokens cover pixels 0-23 only."""
    from coarse2fine.models import create_model

    torch.manual_seed(0)
    backbone = create_model("vgg_small_bn", num_classes=NUM_CLASSES, in_chans=1)
    model, _ = build_herbs(backbone, NUM_CLASSES, HERBSConfig(fpn_size=16), input_size=28)
    image = torch.randn(1, 28, 28)
    panels, _ = explain_panels(model, image, CLASSES)
    stages = {p.title.split(":")[0]: p for p in panels if p.tokens is not None}
    assert set(stages) == {"stage1", "stage2", "stage3"}
    assert stages["stage1"].tokens.isfinite().all() and stages["stage2"].tokens.isfinite().all()  # 14x2, 7x4
    t3 = stages["stage3"].tokens
    assert t3[:24, :24].isfinite().all() and t3[24:].isnan().all() and t3[:, 24:].isnan().all()
    kept = model.eval().explain(image[None])["kept_index"][2][0].tolist()
    for n in range(9):
        i, j = divmod(n, 3)
        assert (t3[8 * i : 8 * i + 8, 8 * j : 8 * j + 8] == float(n in kept)).all()
    assert panels[-1].heat is not None and panels[-1].heat.isfinite().all()  # stage1 covers every pixel
    # background suppression on stage3 alone: the class map leaves out the uncovered border
    bs, _ = build_herbs(create_model("vgg_small_bn", num_classes=NUM_CLASSES, in_chans=1), NUM_CLASSES,
                        HERBSConfig(fpn_size=16, basic="bs"), input_size=28)
    heat = explain_panels(bs, image, CLASSES)[0][-1].heat
    assert heat[:24, :24].isfinite().all() and heat[24:].isnan().all() and heat[:, 24:].isnan().all()


def test_load_image(tmp_path) -> None:
    arr = (np.arange(40 * 60 * 3) % 255).astype(np.uint8).reshape(40, 60, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img, shown = load_image(tmp_path / "a.png", in_chans=3, size=32, scale=36, mean=[0.5] * 3, std=[0.25] * 3)
    assert img.shape == shown.shape == (3, 32, 32)
    assert torch.allclose(img, (shown - 0.5) / 0.25)
    gray, _ = load_image(tmp_path / "a.png", in_chans=1, size=28, scale=None, mean=[0.0], std=[1.0])
    assert gray.shape == (1, 28, 28)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.jpg"):
        load_image(tmp_path / "bad.jpg", in_chans=3, size=32, scale=None, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(DataError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png", in_chans=3, size=32, scale=None, mean=[0.5] * 3, std=[0.5] * 3)


def test_cli_explain_missing_checkpoint(tmp_path, capsys) -> None:
    from coarse2fine.cli import main

    code = main(["explain", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "none.pt")])
    assert code == 2
    assert "none.pt" in capsys.readouterr().err

"""HERBS through the whole stack: recipe -> build -> engine fit -> checkpoint -> load_trained -> c2f explain.

Uses tiny Fashion-MNIST IDX files written under ``tmp_path`` and the factory's ``vgg_small_bn``.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from coarse2fine.config import load_config
from coarse2fine.errors import ModelError
from helpers.models import tiny_swin


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root, n_train_per_class: int = 8, n_test_per_class: int = 3) -> None:
    """Class k: a bright bar at row 2k..2k+3 on noise (easy, but spatial)."""
    rng = np.random.default_rng(0)
    for prefix, per in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = np.repeat(np.arange(10), per)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 2 : 2 * k + 6, 4:24] = 250
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_recipes_are_valid_run_configs() -> None:
    for name in ("fashion_mnist", "cub", "nabirds"):
        cfg = load_config(f"configs/herbs_{name}.yaml")
        assert cfg.method == "herbs"
    cub = load_config("configs/herbs_cub.yaml")
    assert (cub.optim.lr, cub.optim.weight_decay, cub.optim.nesterov) == (5e-4, 3e-4, True)
    assert (cub.data.batch_size, cub.train.accumulate, cub.train.epochs) == (8, 4, 80)
    assert (cub.data.image_size, cub.data.train_scale, cub.schedule.warmup_steps) == (384, [510], 1500)
    for name in ("cub", "nabirds"):  # the official code's loss reduction, projection and Swin stages
        h = load_config(f"configs/herbs_{name}.yaml").herbs
        assert (h.refine_reduction, h.lambda_refine, h.bottom_up_proj, h.swin_stages) == ("mean", 1.375, True, "merged")


def test_herbs_on_factory_backbones() -> None:
    from coarse2fine.herbs import build_herbs
    from coarse2fine.models import create_model

    cfg = load_config("configs/herbs_fashion_mnist.yaml").herbs
    model, objective = build_herbs(create_model("vgg_small_bn", num_classes=10, in_chans=1), 10, cfg, 28)
    out = model(torch.randn(2, 1, 28, 28))
    assert out["logits"].shape == (2, 10)
    assert len(out["heads"]) == 2 * len(model.stage_names) + 1
    assert objective(out, torch.tensor([1, 2]))["loss"].isfinite()


def test_herbs_on_timm_cnn() -> None:
    from coarse2fine.config import HERBSConfig
    from coarse2fine.herbs import build_herbs
    from coarse2fine.models import create_model

    model, _ = build_herbs(create_model("timm/resnet18", num_classes=7), 7, HERBSConfig(fpn_size=32), 64)
    assert model.stage_names == ["stage2", "stage3", "stage4", "stage5"]
    assert model.frozen_unused == ["model.fc.weight", "model.fc.bias"]  # the unused timm classifier
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64))["logits"].shape == (2, 7)


@pytest.mark.parametrize("size", [32, 64])
def test_herbs_on_timm_swin_tokens(size: int) -> None:
    """A real timm Swin gives (B, N, C) tokens; HERBS keeps the official fractions of each stage."""
    from coarse2fine.config import HERBSConfig
    from coarse2fine.herbs import build_herbs

    model, objective = build_herbs(tiny_swin(size), 5, HERBSConfig(fpn_size=16), size)
    assert model.layout == "nlc"
    assert model.token_counts == [(size // r) ** 2 for r in (4, 8, 16, 32)]
    out = model(torch.randn(2, 3, size, size))
    assert [k.shape[1] for k in out["kept_index"]] == model.kept_counts
    assert out["logits"].shape == (2, 5) and len(out["heads"]) == 9
    loss = objective(out, torch.tensor([1, 2]))["loss"]
    loss.backward()
    assert model.backbone.model.patch_embed.proj.weight.grad is not None


def test_herbs_on_timm_swin_at_another_input_size() -> None:
    """Built at 32 px with attention pooling, the same model runs on 64 px images."""
    from coarse2fine.config import HERBSConfig
    from coarse2fine.herbs import build_herbs

    cfg = HERBSConfig(fpn_size=16, combiner_pool="attention")
    model, _ = build_herbs(tiny_swin(32, strict_img_size=False), 5, cfg, 32)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 5)
    assert out["kept_index"][0].shape[1] > model.kept_counts[0]  # a fraction of the larger grid


def test_swin_merged_stages_are_the_tensors_inside_timm() -> None:
    """Merged stage i < L is the input of timm's stage i+1 blocks (after its patch merging); the last is timm's."""
    model = tiny_swin(32).eval()
    seen: list[torch.Tensor] = []
    hooks = [
        layer.blocks.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        for layer in list(model.model.layers)[1:]
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.forward_stages(x)
        for h in hooks:
            h.remove()
        merged = model.forward_merged_stages(x)
    assert [tuple(o.shape) for o in merged] == [(2, 16, 48), (2, 4, 96), (2, 1, 192), (2, 1, 192)]
    for got, inside in zip(merged[:3], seen):
        torch.testing.assert_close(got, inside.flatten(1, 2))
    torch.testing.assert_close(merged[3], plain[3])
    infos = model.merged_stage_info()
    assert [(i.name, i.channels, i.reduction) for i in infos] == [
        ("stage1", 48, 8), ("stage2", 96, 16), ("stage3", 192, 32), ("stage4", 192, 32)
    ]


def test_swin_large_384_merged_pyramid_on_meta_device() -> None:
    """The official pyramid of Swin-L at 384 px (no memory used: meta tensors)."""
    from coarse2fine.herbs import build_herbs
    from coarse2fine.models import create_model

    cfg = load_config("configs/herbs_cub.yaml").herbs
    with torch.device("meta"):
        backbone = create_model("timm/swin_large_patch4_window12_384", num_classes=200)
        x = torch.zeros(1, 3, 384, 384)
        merged = backbone.forward_merged_stages(x)
        plain = backbone.forward_stages(x)
        model, _ = build_herbs(backbone, 200, cfg, 384)
    assert [tuple(o.shape[1:]) for o in merged] == [(2304, 384), (576, 768), (144, 1536), (144, 1536)]
    assert [tuple(o.shape[1:]) for o in plain] == [(9216, 192), (2304, 384), (576, 768), (144, 1536)]
    assert [(i.channels, i.reduction) for i in backbone.merged_stage_info()] == [
        (384, 8), (768, 16), (1536, 32), (1536, 32)
    ]
    assert model.token_counts == [2304, 576, 144, 144] and model.kept_counts == [256, 128, 64, 32]
    assert model.reductions == [8, 16, 32, 32]


def test_herbs_on_merged_swin_stages_and_errors() -> None:
    from coarse2fine.config import HERBSConfig
    from coarse2fine.errors import ConfigError
    from coarse2fine.herbs import build_herbs
    from coarse2fine.models import create_model

    cfg = HERBSConfig(fpn_size=16, swin_stages="merged")
    model, objective = build_herbs(tiny_swin(64), 5, cfg, 64)
    assert model.token_counts == [64, 16, 4, 4]
    out = model(torch.randn(2, 3, 64, 64))
    objective(out, torch.tensor([1, 2]))["loss"].backward()
    assert model.backbone.model.layers[1].downsample.reduction.weight.grad is not None
    with pytest.raises(ModelError, match="swin_stages"):
        build_herbs(create_model("timm/resnet18", num_classes=5), 5, cfg, 64)
    with pytest.raises(ModelError, match="swin_stages"):
        build_herbs(create_model("vgg_small_bn", num_classes=5, in_chans=1), 5, cfg, 28)
    with pytest.raises(ConfigError, match="swin_stages"):
        build_herbs(tiny_swin(64), 5, HERBSConfig(fpn_size=16, swin_stages="late"), 64)  # type: ignore[arg-type]


def test_pretrained_file_mismatch_reaches_the_user(tmp_path, capsys) -> None:
    from coarse2fine.facts import RunFacts
    from coarse2fine.recipes import build_model_and_objective

    bad = tmp_path / "weights.pt"
    torch.save({"not_a_layer.weight": torch.zeros(3)}, bad)
    cfg = load_config("configs/herbs_fashion_mnist.yaml", [f"model.pretrained_file={bad}"])
    with pytest.raises(ModelError):
        stats = {"mean": [0.5], "std": [0.5]}
        facts = RunFacts(in_chans=1, image_size=28, data_stats=stats, classes=list("abcdefghij"))
        build_model_and_objective(cfg, facts)


def test_train_checkpoint_explain_end_to_end(tmp_path, capsys) -> None:
    from coarse2fine.cli import main
    from coarse2fine.recipes import load_trained, train_run

    data = tmp_path / "fmnist"
    data.mkdir()
    write_fashion_mnist(data)
    cfg = load_config(
        "configs/herbs_fashion_mnist.yaml",
        [
            f"data.root={data}",
            "data.batch_size=16",
            "data.workers=0",
            "train.epochs=1",
            "train.device=cpu",
            "train.amp='off'",
            f"out_dir={tmp_path / 'runs'}",
            "name=herbs_tiny",
            "herbs.fpn_size=16",
        ],
    )
    report = train_run(cfg, progress=False)
    assert set(report.test.heads) >= {"combiner", "bu_1", "td_1"}
    ckpt = report.run_dir / "checkpoints" / "best.pt"
    trained = load_trained(ckpt)
    assert type(trained.model).__name__ == "HERBS"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.isfinite(trained.model(x)["logits"]).all()

    img = tmp_path / "shirt.png"
    Image.fromarray(np.full((40, 30), 128, dtype=np.uint8)).save(img)
    code = main(["explain", str(img), "--checkpoint", str(ckpt), "--out", str(tmp_path / "pics")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "pics" / "shirt.png").read_bytes()[:4] == b"\x89PNG"
    assert "shirt.png" in capsys.readouterr().out

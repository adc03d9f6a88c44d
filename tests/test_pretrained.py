"""Pretrained weights (``model.pretrained``) through timm and the Hugging Face hub cache, never the network.

Each test builds a hub cache in the real on-disk layout (``HF_HOME/hub/models--timm--<name>/snapshots/<commit>/``
with ``model.safetensors`` and ``config.json`` written by timm's ``save_for_hf``, ``refs/main`` naming the commit)
holding a tiny timm model's weights, and runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from coarse2fine.cli import main
from coarse2fine.config import load_config
from coarse2fine.engine import load_checkpoint
from coarse2fine.errors import ConfigError, ModelError
from coarse2fine.models import VGG, create_model, pretrained_normalization
from coarse2fine.models.pretrained import timm_weights
from coarse2fine.models.vgg import vgg_state_from_timm
from coarse2fine.recipes import build_backbone, build_datasets, load_trained
from helpers.data import write_learnable_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_resnet"  # ~0.5 M parameters; its default weights: hub id timm/test_resnet.r160_in1k
REPO = "timm/test_resnet.r160_in1k"
HEAD = ("fc.weight", "fc.bias")


def write_hub_repo(hub: Path, repo: str, model: nn.Module, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """``model``'s weights and config as ``repo`` in the hub cache ``hub``; returns the weights file."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    timm.models.save_for_hf(model, str(snapshot), safe_serialization=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot / "model.safetensors"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache at ``$HF_HOME/hub`` with downloads off (huggingface_hub reads both at import)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (home / "hub").mkdir(parents=True)
    return home / "hub"


@pytest.fixture
def cached(hub: Path) -> Path:
    """The hub cache with test_resnet's default weights (random, seeded); returns the weights file."""
    torch.manual_seed(123)
    return write_hub_repo(hub, REPO, timm.create_model(ARCH, pretrained=False))


def _inner(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in model.state_dict().items()}


def _assert_loaded(model: nn.Module, weights: Path, in_chans: int = 3) -> None:
    """Every tensor equals the file's except the re-created head (and the first conv adapted to in_chans)."""
    file, own = load_file(str(weights)), _inner(model)
    for k, v in file.items():
        if k in HEAD:
            assert own[k].shape != v.shape or not torch.equal(own[k], v), k
        elif k == "conv1.0.weight" and in_chans == 1:
            assert torch.allclose(own[k], v.sum(1, keepdim=True)), k  # timm's adapt_input_conv
        else:
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize("spec", [True, "r160_in1k", "test_resnet.r160_in1k", f"hf-hub:{REPO}", REPO])
def test_pretrained_loads_the_cached_hub_weights(cached: Path, spec: bool | str) -> None:
    model = create_model(f"timm/{ARCH}", num_classes=5, pretrained=spec)
    assert model.num_classes == 5 and model.model.fc.out_features == 5
    _assert_loaded(model, cached)


def test_the_recipe_key_loads_weights_and_adapts_the_input_channels(cached: Path) -> None:
    cfg = load_config(None, [f"model.name=timm/{ARCH}", "model.pretrained=true"])
    model = build_backbone(cfg, num_classes=10, in_chans=1)
    assert model.model.conv1[0].in_channels == 1
    _assert_loaded(model, cached, in_chans=1)
    rebuilt = build_backbone(cfg, num_classes=10, in_chans=1, load_files=False)  # a checkpoint: no weights read
    assert not torch.equal(rebuilt.state_dict()["model.conv1.3.weight"], model.state_dict()["model.conv1.3.weight"])


def test_offline_with_an_empty_cache_says_what_to_download_and_where(hub: Path) -> None:
    with pytest.raises(ModelError) as err:
        create_model(f"timm/{ARCH}", num_classes=5, pretrained=True)
    message = str(err.value)
    for part in (REPO, str(hub), f"huggingface-cli download {REPO}", "HF_HUB_OFFLINE", "model.pretrained_file"):
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf-hub:timm/no_such_model.x_in1k", "'timm/no_such_model.x_in1k' are not in the Hugging Face cache"),
        ("resnet18.a1_in1k", "weights of timm architecture 'resnet18', but the model is 'test_resnet'"),
        ("no_such_tag", "timm has no pretrained weights 'test_resnet.no_such_tag'"),
    ],
)
def test_unknown_or_mismatched_weights_are_model_errors(cached: Path, spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        create_model(f"timm/{ARCH}", num_classes=5, pretrained=spec)


def test_a_hub_repository_of_another_architecture_is_refused(hub: Path) -> None:
    write_hub_repo(hub, "timm/test_vit.r160_in1k", timm.create_model("test_vit", pretrained=False))
    with pytest.raises(ModelError, match="holds weights of timm architecture 'test_vit', not 'test_resnet'"):
        create_model(f"timm/{ARCH}", num_classes=5, pretrained="hf-hub:timm/test_vit.r160_in1k")


# ---- our VGG -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True])
def test_timm_vgg_weights_map_onto_our_vgg(batch_norm: bool) -> None:
    """timm's VGG layout (features.N, pre_logits.fc1/fc2 as 7x7/1x1 convs, head.fc) -> ours: same outputs."""
    from timm.models.vgg import VGG as TimmVGG

    torch.manual_seed(0)
    cfg = [8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M"]  # configuration A, narrow
    theirs = TimmVGG(cfg, num_classes=10, mlp_ratio=1 / 64, norm_layer=nn.BatchNorm2d if batch_norm else None)
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    stages = [[8], [16], [32, 32], [32, 32], [32, 32]]
    ours = VGG(stages, num_classes=10, batch_norm=batch_norm, hidden=(64, 4096), input_size=224)
    state, report = vgg_state_from_timm(ours, theirs.state_dict())
    assert report["skipped"] == [] and set(state) == set(ours.state_dict())
    ours.load_state_dict(state)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)
    small = VGG(stages, num_classes=7, in_chans=1, batch_norm=batch_norm, hidden=(64, 4096), input_size=64)
    state, report = vgg_state_from_timm(small, theirs.state_dict())  # FC1 sized for 64 px, 7 classes
    assert report["skipped"] == ["head.fc1", "head.fc2", "head.fc3"]
    assert torch.allclose(state["stage1.conv1.weight"], theirs.state_dict()["features.0.weight"].sum(1, keepdim=True))


def test_vgg_without_timm_weights_and_vgg_offline_are_clear_errors(hub: Path) -> None:
    with pytest.raises(ModelError, match=r"model .vgg_small_bn. has no pretrained weights.*timm/vgg16"):
        create_model("vgg_small_bn", num_classes=10, in_chans=1, pretrained=True)
    with pytest.raises(ModelError, match=r"'timm/vgg11\.tv_in1k' are not in the Hugging Face cache"):
        create_model("vgg11", num_classes=10, pretrained=True)


# ---- the command line -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Fashion-MNIST in the IDX format: class c is a bright row band (learnable)."""
    return write_learnable_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def _train(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.root={root}", f"out_dir={out}", "train.epochs=1", "data.batch_size=50", f"model.name=timm/{ARCH}"]
    sets += ["train.device=cpu", "train.channels_last=false", *extra]
    return ["train", "--config", "configs/fashion_mnist_vgg.yaml", "--name", "pre", "--quiet"] + [
        a for s in sets for a in ("--set", s)
    ]


def test_train_with_pretrained_weights_then_load_without_the_hub(
    cached: Path, fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    # lr 0: the convolutions keep the pretrained weights (BatchNorm statistics still move)
    assert main(_train(fmnist, tmp_path / "runs", "model.pretrained=true", "optim.lr=0", "schedule.name=constant")) == 0
    best = tmp_path / "runs" / "pre" / "checkpoints" / "best.pt"
    state = {k.removeprefix("model."): v for k, v in load_checkpoint(best)["model"].items()}
    file = load_file(str(cached))
    assert torch.allclose(state["conv1.0.weight"], file["conv1.0.weight"].sum(1, keepdim=True))  # 1 channel
    assert all(torch.equal(state[k], v) for k, v in file.items() if k.endswith("conv1.weight") and "layer" in k)
    cached.unlink()  # rebuilding a trained model reads no pretrained weights
    assert load_trained(best).model.num_classes == 10


def test_cli_exit_2_for_a_cache_miss_and_for_weights_of_another_architecture(
    hub: Path, fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(_train(fmnist, tmp_path / "a", "model.pretrained=hf-hub:timm/does_not_exist")) == 2
    assert "'timm/does_not_exist' are not in the Hugging Face cache" in capsys.readouterr().err
    other = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False).state_dict(), str(other))
    assert main(_train(fmnist, tmp_path / "b", f"model.pretrained_file={other}")) == 2
    err = capsys.readouterr().err
    assert f"model.pretrained_file for model 'timm/{ARCH}'" in err and "does not match the model" in err, err
    assert "missing keys ['model.bn1.bias'" in err or "shape mismatch" in err, err


def test_cli_reads_hf_home_and_hf_hub_offline_from_the_environment(fmnist: Path, tmp_path: Path) -> None:
    """A fresh process: huggingface_hub takes its cache and offline mode from the environment."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_home"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "coarse2fine", *_train(fmnist, tmp_path / "runs", "model.pretrained=true")]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 2, res.stderr
    assert f"error: the pretrained weights '{REPO}' are not in the Hugging Face cache" in res.stderr
    assert str(tmp_path / "empty_home" / "hub") in res.stderr and "HF_HUB_OFFLINE=1 is set" in res.stderr


@pytest.mark.parametrize("recipe", ["herbs_cub.yaml", "herbs_nabirds.yaml"])
def test_herbs_recipes_name_the_official_swin_l_22k_weights(recipe: str) -> None:
    cfg = load_config(ROOT / "configs" / recipe)
    assert cfg.model.pretrained == "swin_large_patch4_window12_384.ms_in22k"
    name, hub_id = timm_weights(cfg.model.name.removeprefix("timm/"), cfg.model.pretrained)  # resolves, no download
    assert (name, hub_id) == ("swin_large_patch4_window12_384.ms_in22k", "timm/swin_large_patch4_window12_384.ms_in22k")


def test_pretrained_models_are_normalised_with_their_weights_statistics(
    cached: Path, fmnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.normalize: auto`` with ``model.pretrained``: the weights' own mean/std (timm's pretrained_cfg;
    RGB averaged for grey images), as timm fine-tunes; ``dataset``: the training split's."""
    monkeypatch.chdir(ROOT)
    sets = [f"data.root={fmnist}", f"model.name=timm/{ARCH}", "model.pretrained=true"]

    def stats(*extra: str) -> dict:
        return build_datasets(load_config("configs/fashion_mnist_vgg.yaml", [*sets, *extra])).stats

    own = stats("data.normalize=dataset")
    assert own["mean"][0] < 0.3 and "normalize" not in own  # dark images
    assert stats()["mean"] == [0.5] and stats()["std"] == [0.5]  # test_resnet.r160_in1k: (0.5, 0.5, 0.5)
    assert stats("model.pretrained=false")["mean"] == own["mean"]
    imagenet = pretrained_normalization("vgg11", True)  # our VGG: timm's vgg11.tv_in1k configuration
    assert imagenet is not None and imagenet[0] == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(ConfigError, match=r"data\.normalize.*model\.pretrained"):
        load_config(None, ["data.normalize=pretrained"])

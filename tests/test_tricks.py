"""Training tricks (issue #14): EMA of the weights, Mixup/CutMix with soft targets, RandAugment /
TrivialAugment, random erasing, and progress lines when stderr is not a terminal. Each test checks that
the trick changes what it should (and nothing when it is off)."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from coarse2fine.cli import main
from coarse2fine.config import DataConfig, load_config
from coarse2fine.data.transforms import BatchAugment, TrainBatchTransform, large_train_transform, train_batch_transform
from coarse2fine.engine import CrossEntropyObjective, FitSetup, RunFolder, fit, load_checkpoint
from coarse2fine.engine.progress import Bar, LogProgress, progress
from coarse2fine.recipes import load_trained
from helpers.data import write_learnable_fashion_mnist
from helpers.engine import (
    CLASSES,
    STEPS_PER_EPOCH,
    assert_same_weights,
    comparable,
    make_loaders,
    make_model,
    setup_of,
)
from helpers.engine import run as run_tiny

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]


def _fit(run_dir: Path, setup: FitSetup, **loader: Any) -> tuple[Any, Any]:
    model = make_model()
    tr, va = make_loaders(**loader)
    return model, fit(model, CrossEntropyObjective(), tr, va, setup, RunFolder(run_dir))


# ---- EMA -----------------------------------------------------------------------------------------------


def test_ema_is_validated_checkpointed_and_follows_the_decay(tmp_path: Path) -> None:
    model, result = run_tiny(tmp_path / "slow", epochs=2, ema_decay=0.99)
    rec = result.history[-1]
    assert {"val_ema_top1", "val_ema_top5"} <= set(rec) and 0 <= rec["val_ema_top1"] <= 1
    header = (tmp_path / "slow" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_ema_top1" in header
    last = load_checkpoint(result.last_checkpoint)
    assert set(last["ema"]) == set(last["model"])
    assert_same_weights(last["model"], model.state_dict())
    init = make_model().state_dict()
    moved = [k for k in init if not torch.allclose(last["ema"][k], init[k])]
    lagging = [k for k in init if not torch.allclose(last["ema"][k], last["model"][k], atol=1e-4)]
    assert moved and lagging  # the average left the initial weights but trails the model
    # decay ~0: the average is the model after every step
    _, fast = run_tiny(tmp_path / "fast", epochs=1, ema_decay=1e-9)
    ckpt = load_checkpoint(fast.last_checkpoint)
    assert_same_weights(ckpt["ema"], ckpt["model"], atol=1e-6)
    assert fast.history[-1]["val_ema_top1"] == fast.history[-1]["val_top1"]


def test_no_ema_by_default(tmp_path: Path) -> None:
    _, result = run_tiny(tmp_path, epochs=1)
    assert "val_ema_top1" not in result.history[0]
    assert "ema" not in load_checkpoint(result.last_checkpoint)


def test_best_on_ema_stores_the_ema_weights_in_best(tmp_path: Path) -> None:
    _, result = run_tiny(tmp_path / "ema", epochs=3, ema_decay=0.9, best_on="ema")
    best = load_checkpoint(result.best_checkpoint)
    assert_same_weights(best["model"], best["ema"], atol=0)
    assert result.best_val_top1 == max(r["val_ema_top1"] for r in result.history)
    last = load_checkpoint(result.last_checkpoint)
    assert not all(torch.equal(last["model"][k], last["ema"][k]) for k in last["model"])  # last.pt: the model
    _, on_model = run_tiny(tmp_path / "model", epochs=3, ema_decay=0.9, best_on="model")
    best = load_checkpoint(on_model.best_checkpoint)
    assert not all(torch.equal(best["model"][k], best["ema"][k]) for k in best["model"])
    assert on_model.best_val_top1 == max(r["val_top1"] for r in on_model.history)


def test_resume_restores_the_ema(tmp_path: Path) -> None:
    _, reference = run_tiny(tmp_path / "ref", epochs=3, ema_decay=0.95)
    ref = load_checkpoint(reference.last_checkpoint)

    def crash(i: int) -> None:
        if i == 2 * STEPS_PER_EPOCH + 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(tmp_path / "run", epochs=3, ema_decay=0.95, on_batch=crash)
    _, resumed = run_tiny(tmp_path / "run", epochs=3, ema_decay=0.95, resume=True)
    got = load_checkpoint(resumed.last_checkpoint)
    assert_same_weights(got["ema"], ref["ema"])
    assert comparable(resumed.history) == comparable(reference.history)


def test_resuming_a_run_without_ema_starts_the_ema_from_its_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_tiny(tmp_path, epochs=1)
    with caplog.at_level(logging.WARNING):
        _, result = run_tiny(tmp_path, epochs=2, ema_decay=0.9, resume=True)
    assert "has no EMA weights" in caplog.text and "val_ema_top1" in result.history[-1]


# ---- Mixup / CutMix ------------------------------------------------------------------------------------


def test_soft_targets_use_soft_target_cross_entropy() -> None:
    from timm.loss import SoftTargetCrossEntropy

    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    objective = CrossEntropyObjective(label_smoothing=0.1)
    one_hot = F.one_hot(y, 4).float()
    assert torch.allclose(objective(logits, one_hot)["loss"], F.cross_entropy(logits, y))  # no double smoothing
    soft = torch.softmax(torch.randn(6, 4), 1)
    assert torch.allclose(objective(logits, soft)["loss"], SoftTargetCrossEntropy()(logits, soft))
    assert torch.allclose(objective(logits, y)["loss"], F.cross_entropy(logits, y, label_smoothing=0.1))


def test_one_hot_soft_targets_train_exactly_like_hard_labels(tmp_path: Path) -> None:
    """The batch hook and the soft path: one-hot targets give the hard-label run (loss and argmax accuracy)."""
    _, hard = _fit(tmp_path / "hard", setup_of(epochs=2))
    soft_setup = dataclasses.replace(setup_of(epochs=2), batch_transform=lambda x, y: (x, F.one_hot(y, 4).float()))
    _, soft = _fit(tmp_path / "soft", soft_setup)
    assert comparable(soft.history) == comparable(hard.history)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_mix_images_and_targets(mixup: float, cutmix: float) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    tf = TrainBatchTransform(4, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    x, y = torch.randn(9, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 2])  # odd batch: last kept
    original = x.clone()
    mixed, soft = tf(x, y)
    assert torch.equal(x, original)  # the loader's batch is left alone
    assert soft.shape == (9, 4) and torch.allclose(soft.sum(1), torch.ones(9))
    assert not torch.allclose(mixed[:8], x[:8]) and torch.equal(mixed[8], x[8])
    assert torch.allclose(soft[8], torch.tensor([0.025, 0.025, 0.925, 0.025]))  # smoothed label of the last
    assert (soft[:8].max(1).values < 0.925 + 1e-6).all()
    assert (soft[:8] > 0.025 + 1e-6).sum(1).ge(1).all()


def test_mixed_training_counts_accuracy_by_the_soft_targets_argmax(tmp_path: Path) -> None:
    tf = TrainBatchTransform(4, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    _, result = _fit(tmp_path, dataclasses.replace(setup_of(epochs=2), batch_transform=tf))
    rec = result.history[-1]
    assert 0.25 < rec["train_top1"] <= 1.0 and np.isfinite(rec["train_loss"])
    assert result.history[-1]["val_top1"] > 0.5


def test_the_recipe_builds_the_batch_transform_and_the_paper_recipes_have_none() -> None:
    cfg = load_config(None, ["data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "data.random_erase=0.25"])
    tf = FitSetup.from_run_config(cfg, CLASSES).batch_transform
    assert isinstance(tf, TrainBatchTransform) and tf.soft_targets and tf.erase is not None
    assert tf.mixup.mixup_alpha == 0.8 and tf.mixup.label_smoothing == cfg.train.label_smoothing  # type: ignore
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(recipe)
        assert FitSetup.from_run_config(cfg, CLASSES).batch_transform is None, recipe
        assert (cfg.data.auto_augment, cfg.train.ema_decay) == (None, None), recipe
    assert train_batch_transform(DataConfig(), 4) is None


# ---- random erasing ----------------------------------------------------------------------------------


def test_random_erasing_replaces_a_box_of_every_image_with_noise() -> None:
    torch.manual_seed(0)
    x, y = torch.zeros(8, 3, 32, 32), torch.arange(8) % 4
    erased, targets = TrainBatchTransform(4, random_erase=1.0)(x.clone(), y)
    assert torch.equal(targets, y)  # hard labels stay
    changed = (erased != 0).flatten(1).float().mean(1)
    assert ((changed > 0.01) & (changed < 0.5)).all(), changed
    kept, _ = TrainBatchTransform(4, random_erase=1e-9)(x.clone(), y)
    assert torch.equal(kept, x)


# ---- RandAugment / TrivialAugment --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rand", "trivial"])
@pytest.mark.parametrize("channels", [1, 3])
def test_batch_auto_augment_draws_per_group_and_replays(kind: str, channels: int) -> None:
    images = torch.randint(0, 256, (1, channels, 32, 32), dtype=torch.uint8).expand(64, -1, -1, -1).contiguous()
    mean, std = MEAN[:channels], STD[:channels]
    plain = BatchAugment(mean, std, size=32, train=True, pad=0, flip=False)
    aug = BatchAugment(mean, std, size=32, train=True, pad=0, flip=False, auto_augment=kind)
    base = plain(images, generator=torch.Generator().manual_seed(1))
    out = aug(images, generator=torch.Generator().manual_seed(1))
    assert out.shape == base.shape and out.dtype == torch.float32
    assert not torch.equal(out, base)
    distinct = {tuple(img.flatten()[::97].tolist()) for img in out}
    assert 2 <= len(distinct) <= 16  # one draw per group of the batch: diverse, but not per image
    again = aug(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the loader's (seed, epoch, rank) generator replays it
    state = torch.get_rng_state()
    aug(images, generator=torch.Generator().manual_seed(2))
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    evaluation = BatchAugment(mean, std, size=32, train=False, auto_augment=kind)
    assert evaluation._aa is None


@pytest.mark.parametrize(("kind", "op"), [("rand", v2.RandAugment), ("trivial", v2.TrivialAugmentWide)])
def test_file_pipeline_adds_the_torchvision_op(kind: str, op: type) -> None:
    tf = large_train_transform(MEAN, STD, crop=24, scale=[32], auto_augment=kind, auto_augment_magnitude=5)
    assert any(isinstance(t, op) for t in tf.transforms)
    assert not any(isinstance(t, op) for t in large_train_transform(MEAN, STD, crop=24, scale=[32]).transforms)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert tf(img).shape == (3, 24, 24)


# ---- progress without a terminal ----------------------------------------------------------------------


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fit(tmp_path, dataclasses.replace(setup_of(epochs=2), progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [ln for ln in err.splitlines() if "loss" in ln and "img/s" in ln]
    assert len(lines) >= 4 and all(ln.startswith("train ") for ln in lines), err
    assert any("train 2/2: step 8/8 (100%)" in ln for ln in lines) and "acc " in lines[-1]
    _fit(tmp_path / "quiet", setup_of(epochs=1))  # progress off: nothing
    assert capsys.readouterr().err == ""


def test_progress_picks_tqdm_on_a_terminal_and_lines_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress(range(3), total=3, desc="x", enabled=True, stream=Terminal())
    assert isinstance(bar, Bar) and list(bar) == [0, 1, 2]
    bar.close()
    out = io.StringIO()
    lines = progress(range(200), total=200, desc="eval", enabled=True, every_pct=10, stream=out)
    assert isinstance(lines, LogProgress) and list(lines) == list(range(200))
    lines.close()
    text = out.getvalue().splitlines()
    assert len(text) == 10 and text[0].startswith("eval: step 20/200 (10%)") and text[-1].startswith("eval: step 200")


# ---- the command line: every trick of a plain run together -----------------------------------------------


def test_train_with_every_trick_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    root = write_learnable_fashion_mnist(tmp_path / "fmnist")
    sets = [f"data.root={root}", f"out_dir={tmp_path / 'runs'}", "train.epochs=2", "data.batch_size=50"]
    sets += ["data.auto_augment=trivial", "data.random_erase=0.25", "data.mixup_alpha=0.2", "data.cutmix_alpha=1"]
    sets += ["train.ema_decay=0.9", "train.best_on=ema"]
    args = ["train", "--config", "configs/fashion_mnist_vgg.yaml", "--name", "tricks", "--quiet"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    best = tmp_path / "runs" / "tricks" / "checkpoints" / "best.pt"
    trained = load_trained(best)
    ckpt = load_checkpoint(best)
    assert_same_weights(trained.model.state_dict(), ckpt["ema"], atol=0)  # load_trained gives the EMA model

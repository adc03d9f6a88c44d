"""engine.evaluate / predict_proba / save_eval_artifacts against hand computations; optimizers and
learning-rate schedules."""

from __future__ import annotations

import io
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, top_k_accuracy_score

from coarse2fine.config import OptimConfig, ScheduleConfig
from coarse2fine.engine import (
    CrossEntropyObjective,
    build_optimizer,
    build_scheduler,
    evaluate,
    predict_proba,
    save_eval_artifacts,
)
from helpers.engine import TinyNet

C = 7


class ScoresAsInput(torch.nn.Module):
    """The 'images' are the logits; a second head predicts the negated scores."""

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"logits": x, "heads": {"neg": -x}}


def fixed_batches(n: int = 53, batch: int = 8) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any, Any]:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(n, C, generator=g)
    targets = torch.randint(0, C - 1, (n,), generator=g)  # class C-1 never occurs
    scores[torch.arange(n)[: n // 2], targets[: n // 2]] += 2.0  # about half clearly right
    batches = [(scores[i : i + batch], targets[i : i + batch]) for i in range(0, n, batch)]
    return batches, scores, targets


def test_evaluate_matches_hand_computation() -> None:
    batches, scores, targets = fixed_batches()
    res = evaluate(ScoresAsInput(), batches, num_classes=C, device="cpu", objective=CrossEntropyObjective())
    y, s = targets.numpy(), scores.numpy()
    pred = s.argmax(1)
    labels = list(range(C))
    assert res.num_samples == len(y)
    assert np.array_equal(res.confusion, confusion_matrix(y, pred, labels=labels))
    assert res.confusion.dtype == np.int64
    assert res.top1 == pytest.approx(float((pred == y).mean()))
    assert res.top5 == pytest.approx(top_k_accuracy_score(y, s, k=5, labels=labels))
    present = recall_score(y, pred, labels=labels[:-1], average=None, zero_division=0)
    assert np.allclose(res.per_class[:-1], present)
    assert math.isnan(res.per_class[-1])  # no sample of the last class
    assert res.heads["neg"] == pytest.approx(float(((-s).argmax(1) == y).mean()))
    assert res.loss == pytest.approx(F.cross_entropy(scores, targets).item(), rel=1e-5)
    assert res.mean_class_accuracy == pytest.approx(float(np.mean(present)))
    precision, _, f1 = res.precision_recall_f1()
    assert np.allclose(f1, f1_score(y, pred, labels=labels, average=None, zero_division=0))
    assert np.allclose(precision, precision_score(y, pred, labels=labels, average=None, zero_division=0))
    summary = res.to_dict()
    assert summary["macro_f1"] == pytest.approx(f1_score(y, pred, labels=labels[:-1], average="macro"))


def test_predict_proba_is_softmax_in_order() -> None:
    batches, scores, targets = fixed_batches()
    probs, ys = predict_proba(ScoresAsInput(), batches, device="cpu")
    assert probs.shape == (len(targets), C) and probs.dtype == np.float32
    assert np.allclose(probs, torch.softmax(scores, 1).numpy(), atol=1e-6)
    assert np.array_equal(ys, targets.numpy())


def test_evaluate_restores_training_mode() -> None:
    model = TinyNet()
    model.train()
    x = torch.randn(4, 1, 8, 8)
    evaluate(model, [(x, torch.zeros(4, dtype=torch.long))], num_classes=4, device="cpu", channels_last=True)
    assert model.training


def test_save_eval_artifacts(tmp_path: Path) -> None:
    import matplotlib.image

    batches, _, _ = fixed_batches()
    res = evaluate(ScoresAsInput(), batches, num_classes=C, device="cpu")
    names = [f"class_{i}" for i in range(C)]
    paths = save_eval_artifacts(res, tmp_path / "eval", names, prefix="test")
    data = json.loads(paths["metrics"].read_text())
    assert data["top1"] == pytest.approx(res.top1) and data["num_samples"] == res.num_samples
    assert list(data["per_class"]) == names and data["per_class"]["class_6"] is None
    assert data["heads"]["neg"] == pytest.approx(res.heads["neg"])
    assert np.array_equal(np.load(paths["confusion_npy"]), res.confusion)
    img = matplotlib.image.imread(paths["confusion_png"])
    assert img.ndim == 3 and img.shape[0] > 100
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "test_confusion.npy",
        "test_confusion.png",
        "test_metrics.json",
    ]


# ---- optimizers ----------------------------------------------------------------------------------


def test_optimizer_has_no_weight_decay_on_bias_and_norm() -> None:
    model = torch.nn.Sequential(TinyNet(), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 1e-3 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay == {id(named["0.conv.weight"]), id(named["0.fc.weight"])}
    assert no_decay == {id(p) for n, p in named.items() if n.endswith("bias") or n.startswith("1.")}
    groups = [{"params": list(model[0].conv.parameters()), "lr": 0.5}, {"params": list(model[0].fc.parameters())}]
    opt = build_optimizer(groups, OptimConfig(name="adamw", lr=0.1, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted((g.get("lr"), g["weight_decay"]) for g in opt.param_groups) == [
        (0.1, 0.0),
        (0.1, 0.05),
        (0.5, 0.0),
        (0.5, 0.05),
    ]


# ---- schedules -----------------------------------------------------------------------------------


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr, momentum=0.9)


def _run_steps(sched: Any, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step_update()
    return lrs


def test_plateau_divides_by_ten_at_most_max_reductions() -> None:
    cfg = ScheduleConfig(name="plateau", plateau_patience=1, plateau_factor=0.1, max_reductions=2)
    sched = build_scheduler(_opt(0.1), cfg, steps_per_epoch=5, epochs=20)
    lrs = []
    for metric in [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:
        _run_steps(sched, 5)  # per-step calls leave a plateau schedule alone
        sched.step_epoch(metric)
        lrs.append(sched.get_last_lr()[0])
    expected = [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001, 0.001]
    assert lrs == pytest.approx(expected)
    sched.step_epoch(0.9)  # improvement does not raise the lr again
    assert sched.get_last_lr()[0] == pytest.approx(0.001)


def test_cosine_with_linear_warmup() -> None:
    cfg = ScheduleConfig(name="cosine", warmup_steps=4, min_lr=0.001)
    lrs = _run_steps(build_scheduler(_opt(0.1), cfg, steps_per_epoch=10, epochs=2), 20)
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[4 + 8] == pytest.approx(0.001 + (0.1 - 0.001) * 0.5)  # half-way through the decay
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[-1] == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    # warm-up given in epochs: half an epoch of 10 steps = 5 steps
    cfg = ScheduleConfig(name="cosine", warmup_epochs=0.5)
    lrs = _run_steps(build_scheduler(_opt(0.1), cfg, steps_per_epoch=10, epochs=2), 6)
    assert lrs[:6] == pytest.approx([0.1 * (s + 1) / 6 for s in range(5)] + [0.1])


def test_onecycle_and_constant() -> None:
    cfg = ScheduleConfig(name="onecycle", warmup_steps=5)
    lrs = _run_steps(build_scheduler(_opt(0.1), cfg, steps_per_epoch=10, epochs=2), 20)
    assert lrs[0] == pytest.approx(0.1 / 25)  # OneCycleLR's initial lr = max_lr / div_factor
    assert max(lrs) == pytest.approx(0.1) and int(np.argmax(lrs)) == 4
    assert lrs[-1] < 1e-3
    const = _run_steps(build_scheduler(_opt(0.1), ScheduleConfig(name="constant"), 10, 2), 20)
    assert const == pytest.approx([0.1] * 20)


@pytest.mark.parametrize("name", ["plateau", "cosine", "onecycle", "constant"])
def test_schedule_state_round_trips_through_weights_only(name: str) -> None:
    cfg = ScheduleConfig(name=name, warmup_steps=3, plateau_patience=0)

    def make() -> Any:
        return build_scheduler(_opt(0.1), cfg, steps_per_epoch=10, epochs=3)

    a = make()
    for m in (0.5, 0.4):
        _run_steps(a, 10)
        a.step_epoch(m)
    buf = io.BytesIO()
    torch.save({"sched": a.state_dict(), "opt": a.optimizer.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = make()
    b.optimizer.load_state_dict(saved["opt"])
    b.load_state_dict(saved["sched"])
    _run_steps(a, 5)
    a.step_epoch(0.3)
    _run_steps(b, 5)
    b.step_epoch(0.3)
    assert a.get_last_lr() == pytest.approx(b.get_last_lr())
    assert a.reductions == b.reductions and a.steps == b.steps


@pytest.mark.parametrize("name", ["cosine", "onecycle"])
def test_resumed_schedule_follows_the_new_length(name: str) -> None:
    """A run resumed with more epochs keeps stepping (OneCycleLR would raise past its old end)."""
    cfg = ScheduleConfig(name=name, warmup_steps=2)
    short = build_scheduler(_opt(0.1), cfg, steps_per_epoch=5, epochs=1)
    _run_steps(short, 5)
    longer = build_scheduler(_opt(0.1), cfg, steps_per_epoch=5, epochs=2)
    longer.optimizer.load_state_dict(short.optimizer.state_dict())
    longer.load_state_dict(short.state_dict())
    fresh = build_scheduler(_opt(0.1), cfg, steps_per_epoch=5, epochs=2)
    expected = _run_steps(fresh, 10)[5:]
    got = _run_steps(longer, 5)
    assert got[1:] == pytest.approx(expected[1:])  # the lr right after loading is the old schedule's last
    assert longer.steps == 10


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    ev = sys.modules["coarse2fine.engine.evaluate"]  # the package's `evaluate` is the function
    cpu = torch.device("cpu")
    ev._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(ev, "cpu_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="coarse2fine.engine.evaluate"):
        assert ev.autocast_dtype("bf16", cpu) is torch.bfloat16
        assert ev.autocast_dtype("bf16", cpu) is torch.bfloat16
        assert ev.autocast_dtype("off", cpu) is None
    warned = [r for r in caplog.records if "train.amp=off" in r.getMessage()]
    assert len(warned) == 1
    ev._warn_emulated_bf16.cache_clear()
    caplog.clear()
    monkeypatch.setattr(ev, "cpu_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="coarse2fine.engine.evaluate"):
        ev.autocast_dtype("bf16", cpu)
    assert not caplog.records
    monkeypatch.undo()
    assert ev.cpu_native_bf16() in (True, False, None)


def test_tune_malloc_applies_on_glibc_and_respects_the_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI fixes glibc's malloc thresholds (engine/allocator.py); a user's MALLOC_* or LD_PRELOAD wins."""
    import platform

    from coarse2fine.engine.allocator import ENV_KEYS, tune_malloc

    for key in ("LD_PRELOAD", *ENV_KEYS):
        monkeypatch.delenv(key, raising=False)
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is on_glibc
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert tune_malloc() is False

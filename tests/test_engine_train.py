"""engine.fit: learning, resume, faults (signals, SIGKILL, NaN, failing saves), accumulation."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coarse2fine.engine import (
    Callback,
    CrossEntropyObjective,
    CSVLogger,
    FitState,
    NonFiniteLossError,
    RunFolder,
    TensorBoardLogger,
    TrainingInterrupted,
    default_callbacks,
    evaluate,
    fit,
    load_checkpoint,
)
from coarse2fine.engine import checkpoint as ckpt_mod
from coarse2fine.errors import CheckpointError, ConfigError
from helpers.engine import (
    CLASSES,
    EPOCHS,
    STEPS_PER_EPOCH,
    NaNAt,
    assert_same_weights,
    comparable,
    make_loaders,
    make_model,
    reference_run,
    run,
    setup_of,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference_run(tmp_path_factory.mktemp("reference"))


def test_fit_learns_separable_problem(reference: dict[str, Any]) -> None:
    result = reference["result"]
    _, val = make_loaders()
    untrained = evaluate(make_model(), val, num_classes=len(CLASSES), device="cpu")
    final = result.history[-1]["val_top1"]
    assert final >= 0.9 and final > untrained.top1 + 0.4, (untrained.top1, final)
    assert result.best_val_top1 == max(r["val_top1"] for r in result.history)
    assert result.history[result.best_epoch - 1]["val_top1"] == result.best_val_top1
    run_dir = result.run.root
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for col in (
        "epoch",
        "lr",
        "train_loss",
        "train_ce",
        "train_top1",
        "val_top1",
        "val_top5",
        "seconds",
        "images_per_s",
        "skipped_steps",
    ):
        assert col in header
    assert len(rows) == 1 + EPOCHS
    last = load_checkpoint(result.last_checkpoint)
    best = load_checkpoint(result.best_checkpoint)
    assert last["epoch"] == EPOCHS and best["epoch"] == result.best_epoch
    assert last["classes"] == CLASSES and last["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*.pt")) == [
        f"epoch_{e:03d}.pt" for e in range(1, EPOCHS + 1)
    ]
    assert any((run_dir / "tb").iterdir())


def test_dict_outputs_report_head_accuracy(tmp_path: Path) -> None:
    model = make_model(heads=True)
    tr, va = make_loaders()
    result = fit(model, CrossEntropyObjective(), tr, va, setup_of(epochs=1, keep_checkpoints=0), RunFolder(tmp_path))
    assert "val_aux_top1" in result.history[0]
    assert not list((tmp_path / "checkpoints").glob("epoch_*.pt"))


def test_resume_after_crash_in_epoch_k_matches_uninterrupted(tmp_path: Path, reference: dict[str, Any]) -> None:
    def crash(i: int) -> None:
        if i == 2 * STEPS_PER_EPOCH + 1:  # second batch of epoch 3
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, epochs=EPOCHS, on_batch=crash)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2
    model, result = run(tmp_path, epochs=EPOCHS, resume=True)
    assert_same_weights(model.state_dict(), reference["state"])
    assert comparable(result.history) == reference["history"]


def test_resume_with_more_epochs_continues(tmp_path: Path) -> None:
    run(tmp_path, epochs=1)
    _, result = run(tmp_path, epochs=2, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["global_step"] == 2 * STEPS_PER_EPOCH


def _fit_nan(run_dir: Path, policy: str, at: int) -> Any:
    model = make_model()
    tr, va = make_loaders()
    result = fit(model, NaNAt(at), tr, va, setup_of(epochs=EPOCHS, nan_policy=policy), RunFolder(run_dir))
    return model, result


def test_nan_loss_stop_names_step_and_keeps_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 of 8"):
        _fit_nan(tmp_path, "stop", at=STEPS_PER_EPOCH + 2)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert last["epoch"] == 1 and best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_nan_loss_skip_continues_and_counts(tmp_path: Path) -> None:
    model, result = _fit_nan(tmp_path, "skip", at=STEPS_PER_EPOCH + 2)
    assert [r["skipped_steps"] for r in result.history] == [0, 1, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.history[-1]["val_top1"] >= 0.9
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["global_step"] == EPOCHS * STEPS_PER_EPOCH - 1


def test_failing_save_during_fit_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ckpt_mod._torch_write
    calls = {"n": 0}

    def flaky(obj: Any, f: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # initial save, epoch 1, then epoch 2 fails half-way
            f.write(b"PK\x03\x04 partial")
            raise OSError(28, "No space left on device")
        real(obj, f)

    monkeypatch.setattr(ckpt_mod, "_torch_write", flaky)
    with pytest.raises(CheckpointError, match="No space left"):
        run(tmp_path, epochs=EPOCHS)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_fresh_run_refuses_to_overwrite_existing_run(tmp_path: Path) -> None:
    run(tmp_path, epochs=1)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        run(tmp_path, epochs=1)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_gradient_accumulation_matches_larger_batch(tmp_path: Path, reference: dict[str, Any]) -> None:
    model, _ = run(tmp_path, epochs=EPOCHS, batch_size=16, accumulate=2)
    assert_same_weights(model.state_dict(), reference["state"], atol=1e-5)


def test_signal_on_last_batch_completes_the_epoch(tmp_path: Path) -> None:
    """In-process SIGINT at the epoch's last batch: that epoch is validated and saved, then training stops."""

    def interrupt(i: int) -> None:
        if i == STEPS_PER_EPOCH - 1:
            os.kill(os.getpid(), signal.SIGINT)

    original = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`
    with pytest.raises(TrainingInterrupted, match=r"SIGINT during epoch 2; .*last\.pt holds epoch 1") as info:
        run(tmp_path, epochs=EPOCHS, on_batch=interrupt)
    assert info.value.epoch == 1 and info.value.signal_name == "SIGINT"
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is original  # handlers restored


def test_metadata_is_stored_as_plain_data(tmp_path: Path) -> None:
    model = make_model()
    tr, va = make_loaders()
    meta = {"hierarchy": {"groups": np.array([[0, 1], [2, 3]]), "k": np.int64(2), "names": ("a", "b")}}
    fit(model, CrossEntropyObjective(), tr, va, setup_of(meta, epochs=1), RunFolder(tmp_path / "ok"))
    saved = load_checkpoint(tmp_path / "ok" / "checkpoints" / "last.pt")["metadata"]
    assert saved == {"hierarchy": {"groups": [[0, 1], [2, 3]], "k": 2, "names": ["a", "b"]}}
    with pytest.raises(CheckpointError, match=r"metadata\.bad: object is not plain data"):
        fit(model, CrossEntropyObjective(), tr, va, setup_of({"bad": object()}, epochs=1), RunFolder(tmp_path / "bad"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"nan_policy": "ignore"}, r"train\.nan_policy.*'ignore'"),
        ({"amp": "fp8"}, r"train\.amp.*'fp8'"),
        ({"accumulate": 0}, r"train\.accumulate"),
        ({"epochs": 0}, r"train\.epochs"),
    ],
)
def test_bad_train_settings_are_config_errors(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    settings = dict(override)
    epochs = settings.pop("epochs", 3)
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, epochs=epochs, **settings)
    assert not (tmp_path / "checkpoints").exists()


def test_empty_training_loader_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no batch"):
        run(tmp_path, batch_size=512)  # 256 samples, drop_last


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_fit_start(self, state: FitState) -> None:
        self.calls.append(("start", state.epoch))

    def on_step_end(self, step: int, values: Mapping[str, float]) -> None:
        self.calls.append(("step", step, sorted(values)))

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        self.calls.append(("epoch", epoch, record["val_top1"]))

    def on_fit_end(self, state: FitState, error: BaseException | None) -> None:
        self.calls.append(("end", state.epoch, type(error).__name__ if error is not None else None))


def test_callbacks_get_every_hook_and_replace_the_default_loggers(tmp_path: Path) -> None:
    rec = Recorder()
    tr, va = make_loaders()
    result = fit(
        make_model(), CrossEntropyObjective(), tr, va, setup_of(epochs=2, log_every=4), RunFolder(tmp_path), [rec]
    )
    assert rec.calls[0] == ("start", 0) and rec.calls[-1] == ("end", 2, None)
    assert [c[1:] for c in rec.calls if c[0] == "step"] == [(s, ["loss", "lr"]) for s in (4, 8, 12, 16)]
    assert [c[1:] for c in rec.calls if c[0] == "epoch"] == [(r["epoch"], r["val_top1"]) for r in result.history]
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "tb").exists()


def test_on_fit_end_gets_the_error(tmp_path: Path) -> None:
    rec = Recorder()
    tr, va = make_loaders()
    with pytest.raises(NonFiniteLossError):
        fit(make_model(), NaNAt(2), tr, va, setup_of(epochs=1), RunFolder(tmp_path), [rec])
    assert rec.calls == [("start", 0), ("end", 0, "NonFiniteLossError")]


def test_default_callbacks_are_loggers_chosen_by_name(tmp_path: Path) -> None:
    run_folder = RunFolder(tmp_path)
    assert [type(c) for c in default_callbacks(run_folder)] == [CSVLogger, TensorBoardLogger]
    assert [type(c) for c in default_callbacks(run_folder, ["csv"])] == [CSVLogger]
    with pytest.raises(ConfigError, match=r"unknown logger\(s\) 'comet'; choose from csv, tensorboard, mlflow, wandb"):
        default_callbacks(run_folder, ["comet"])


def test_resumed_run_keeps_the_earlier_metrics_rows(tmp_path: Path) -> None:
    run(tmp_path, epochs=1)
    run(tmp_path, epochs=2, resume=True)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2"]

"""What a run writes, and when (issue #17): nothing before every setting, the data and the model were
accepted; ``config.yaml`` only once the run folder accepted the run (a refused resume keeps the file that
describes the checkpoints); a run that died in its first epoch restarts without ``--overwrite``;
``--overwrite`` empties the folder it replaces; ``c2f train --check`` writes nothing."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml

from coarse2fine.cli import main
from coarse2fine.engine.checkpoint import load_checkpoint
from helpers.data import write_learnable_fashion_mnist


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class j is a bright bar at rows 2j + 3 to 2j + 6."""
    return write_learnable_fashion_mnist(tmp_path_factory.mktemp("fmnist"), 60, 20, bar=(3, 6), value=255)


def _train(fmnist: Path, out: Path, *extra: str) -> int:
    args = ["train", "--config", "configs/fashion_mnist_vgg.yaml", "--name", "r", "--quiet"]
    settings = [
        f"data.root={fmnist}",
        f"out_dir={out}",
        "train.epochs=1",
        "data.batch_size=10",
        "model.name=vgg_small_fast",
        "schedule.name=constant",
        "train.device=cpu",
        "train.threads=1",
    ]
    return main([*args, *[a for s in settings for a in ("--set", s)], *extra])


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if line.startswith("error: "))


@pytest.fixture(scope="module")
def finished(fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert _train(fmnist, out) == 0
    return out / "r"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.epochz=3", "unknown key(s) 'epochz'"),  # the recipe
        ("data.name=folder", "no class folders"),  # the data (the IDX folder holds no class folders)
        ("model.name=vgg61", "unknown model 'vgg61'"),  # the model
        ("data.image_size=100000", "data.image_size=100000 is over 8192 pixels"),  # the transforms
        ("schedule.warmup_steps=1000", "warm-up of 1000 steps leaves no room"),  # the schedule, built by fit
        ("method=hdcnn", "c2f hdcnn fit"),
    ],
)
def test_a_refused_run_creates_no_folder(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    extra = ["--set", "schedule.name=onecycle"] if "warmup" in setting else []
    assert _train(fmnist, tmp_path / "runs", *extra, "--set", setting) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "runs").exists()


def test_the_run_folder_holds_config_yaml_and_plain_newlines(finished: Path) -> None:
    config = yaml.safe_load((finished / "config.yaml").read_text())
    assert config["name"] == "r" and config["model"]["name"] == "vgg_small_fast"
    metrics = (finished / "metrics.csv").read_bytes()
    assert b"\r" not in metrics and metrics.count(b"\n") == 2  # header and one epoch, '\n' only


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_refused_resume_or_start_keeps_config_yaml(
    fmnist: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished, tmp_path / "r")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # resume with another architecture: check_compatible refuses last.pt
    assert _train(fmnist, tmp_path, "--resume", "--set", "model.name=vgg_small_bn") == 2
    assert "last.pt" in _error(capsys)
    # a fresh start over a finished run without --overwrite
    assert _train(fmnist, tmp_path, "--set", "optim.lr=0.5") == 2
    assert "already exists: resume that run (--resume), start it afresh (--overwrite)" in _error(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # an accepted resume rewrites config.yaml with the settings the next checkpoints carry
    assert _train(fmnist, tmp_path, "--resume", "--set", "train.epochs=2") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_run_that_died_in_its_first_epoch_restarts_without_overwrite(
    fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # lr 1e30: the loss is not finite at the first step; last.pt holds the untrained state (epoch 0)
    assert _train(fmnist, tmp_path, "--set", "optim.lr=1e30") == 2
    hint = _error(capsys)
    assert "non-finite loss" in hint and "--set optim.lr=1e+29" in hint and "--set train.nan_policy=skip" in hint
    run = tmp_path / "r"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 0
    (run / "tb" / "stale.events").write_text("from the run that died")
    with caplog.at_level(logging.INFO, logger="coarse2fine.engine.run_folder"):
        assert _train(fmnist, tmp_path) == 0  # no --overwrite needed
    assert any("holds no completed epoch" in r.getMessage() for r in caplog.records)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (run / "tb" / "stale.events").exists()


def test_overwrite_empties_the_folder_it_replaces_once_the_new_run_is_accepted(
    fmnist: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(finished, tmp_path / "r")
    outside = tmp_path / "keep.txt"
    outside.write_text("not the run's")
    (run / "notes.txt").write_text("old")
    (run / "old_eval").mkdir()
    (run / "old_eval" / "val_metrics.json").write_text("{}")
    (run / "link.txt").symlink_to(outside)
    (run / "nested").mkdir()
    (run / "nested" / "config.yaml").write_text("name: nested\n")  # a run of its own: kept
    old_events = sorted(p.name for p in (run / "tb").iterdir())
    # refused (unknown model): nothing is removed
    assert _train(fmnist, tmp_path, "--overwrite", "--set", "model.name=vgg61") == 2
    assert "vgg61" in _error(capsys)
    assert (run / "notes.txt").exists() and (run / "link.txt").is_symlink() and (run / "test_metrics.json").exists()
    # accepted: the previous run's files are gone, a link is removed but not followed, a nested run kept
    assert _train(fmnist, tmp_path, "--overwrite", "--set", "train.epochs=1", "--set", "optim.lr=0.02") == 0
    assert not (run / "notes.txt").exists() and not (run / "old_eval").exists() and not (run / "link.txt").exists()
    assert outside.read_text() == "not the run's" and (run / "nested" / "config.yaml").exists()
    assert not set(old_events) & {p.name for p in (run / "tb").iterdir()}
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.02
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "epoch_001.pt", "last.pt"]


def test_check_decides_like_a_run_and_writes_nothing(
    fmnist: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(fmnist, tmp_path / "fresh", "--check") == 0
    out = capsys.readouterr().out
    assert "ok: 10 classes (50 train, 10 val, 20 test images); model vgg_small_fast" in out and "would start" in out
    assert not (tmp_path / "fresh").exists()
    run = _copy(finished, tmp_path / "r")
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert _train(fmnist, tmp_path, "--check", "--resume", "--set", "train.epochs=3") == 0
    assert "would resume after epoch 1; nothing was written" in capsys.readouterr().out
    assert _train(fmnist, tmp_path, "--check", "--overwrite") == 0
    assert "would start afresh, replacing the previous run" in capsys.readouterr().out
    assert _train(fmnist, tmp_path, "--check") == 2
    assert "already exists" in _error(capsys)
    assert _train(fmnist, tmp_path, "--check", "--resume", "--set", "model.name=vgg_small_bn") == 2
    assert "last.pt" in _error(capsys)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == stamps and os.listdir(run)

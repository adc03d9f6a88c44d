"""Experiment loggers chosen by ``train.loggers``: MLflow read back with its client, W&B offline (when
installed), a missing package refused before anything is written, names checked at config load."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from coarse2fine.config import RunConfig, from_dict, load_config
from coarse2fine.engine import NonFiniteLossError, RunFolder
from coarse2fine.engine.callbacks import LogSettings, flatten
from coarse2fine.engine.checkpoint import load_checkpoint
from coarse2fine.errors import ConfigError
from helpers.engine import NaNAt, run

mlflow_missing = importlib.util.find_spec("mlflow") is None
wandb_missing = importlib.util.find_spec("wandb") is None


def _client(uri: str):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _only_run(client, experiment: str):  # type: ignore[no-untyped-def]
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.skipif(mlflow_missing, reason="mlflow is not installed (pip install mlflow-skinny)")
def test_mlflow_run_holds_params_metrics_and_best_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "store").as_uri()
    run_dir = tmp_path / "run"
    _, result = run(run_dir, epochs=2, loggers=["csv", "mlflow"], mlflow_uri=uri, experiment="tiny", log_every=4)
    client = _client(uri)
    logged = _only_run(client, "tiny")
    run_id = logged.info.run_id
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "run"
    params = logged.data.params
    assert params["optim.lr"] == "0.05"
    assert params["train.epochs"] == "2"
    assert params["train.loggers"] == "['csv', 'mlflow']"
    assert params["seed"] == "0"

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == 2
    for key in ("lr", "train_loss", "train_top1", "val_top1", "val_top5", "skipped_steps"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == pytest.approx([float(row[key]) for row in rows], rel=1e-5)
    assert "epoch" not in logged.data.metrics  # it is the step
    steps = client.get_metric_history(run_id, "step/loss")
    assert [m.step for m in steps] == [4, 8, 12, 16]  # 8 steps per epoch, log_every 4
    assert [m.step for m in client.get_metric_history(run_id, "step/lr")] == [4, 8, 12, 16]

    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]
    assert "metrics.csv" in [a.path for a in client.list_artifacts(run_id)]
    best = Path(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path / "download")))
    assert best.read_bytes() == result.best_checkpoint.read_bytes()
    assert load_checkpoint(best)["epoch"] == result.best_epoch


@pytest.mark.skipif(mlflow_missing, reason="mlflow is not installed (pip install mlflow-skinny)")
def test_mlflow_failed_run_ends_failed_in_the_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "nan_run"
    with pytest.raises(NonFiniteLossError):
        run(run_dir, epochs=1, objective=NaNAt(2), nan_policy="stop", loggers=["mlflow"])
    store = run_dir / "mlruns"  # train.mlflow_uri None: a file store in the run folder
    assert store.is_dir()
    logged = _only_run(_client(store.as_uri()), "nan_run")  # train.experiment None: the run's name
    assert logged.info.status == "FAILED"
    assert logged.data.params["train.nan_policy"] == "stop"
    assert not (run_dir / "metrics.csv").exists()  # no csv logger chosen


def test_missing_mlflow_is_a_config_error_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(ConfigError, match=r"train\.loggers: 'mlflow' needs .*pip install mlflow-skinny"):
        run(tmp_path / "run", epochs=1, loggers=["csv", "mlflow"])
    assert not (tmp_path / "run").exists()


def test_missing_wandb_is_a_config_error_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"train\.loggers: 'wandb' needs the wandb package.*`pip install wandb`"):
        run(tmp_path / "run", epochs=1, loggers=["csv", "wandb"])
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(wandb_missing, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_is_written_inside_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run(run_dir, epochs=1, loggers=["csv", "wandb"], wandb_mode="offline", log_every=4)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))  # the run's records, for `wandb sync`
    assert (offline[0] / "files" / "metrics.csv").is_file()


def test_loggers_are_checked_at_config_load() -> None:
    cfg = load_config(None, ["train.loggers=[csv, mlflow]", "train.wandb_mode=disabled"])
    assert cfg.train.loggers == ["csv", "mlflow"]
    assert cfg.train.mlflow_uri is None and cfg.train.experiment is None
    assert RunConfig().train.loggers == ["csv", "tensorboard"]
    assert RunConfig().train.wandb_mode == "offline"
    with pytest.raises(ConfigError, match=r"train\.loggers\[1\]: unknown value 'comet'; choose one of csv, tensorb"):
        from_dict(RunConfig, {"train": {"loggers": ["csv", "comet"]}})
    with pytest.raises(ConfigError, match=r"train\.loggers: csv named more than once"):
        from_dict(RunConfig, {"train": {"loggers": ["csv", "csv"]}})
    with pytest.raises(ConfigError, match=r"train\.wandb_mode: unknown value 'cloud'"):
        from_dict(RunConfig, {"train": {"wandb_mode": "cloud"}})


def test_params_are_the_flattened_config_and_experiment_defaults_to_the_name(tmp_path: Path) -> None:
    assert flatten({"seed": 0, "optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "a": {"b": {"c": None}}}) == {
        "seed": 0,
        "optim.lr": 0.1,
        "optim.betas": [0.9, 0.99],
        "a.b.c": None,
    }
    folder = RunFolder(tmp_path / "stage1")
    assert LogSettings(params={"name": "recipe"}).experiment_of(folder) == "recipe"
    assert LogSettings().experiment_of(folder) == "stage1"
    assert LogSettings(experiment="mine", params={"name": "recipe"}).experiment_of(folder) == "mine"


@pytest.mark.skipif(mlflow_missing, reason="mlflow is not installed (pip install mlflow-skinny)")
def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "store").as_uri()
    run_dir = tmp_path / "run"
    kw = {"loggers": ["mlflow"], "mlflow_uri": uri, "experiment": "tiny"}
    run(run_dir, epochs=1, **kw)
    run(run_dir, epochs=2, resume=True, **kw)
    client = _client(uri)
    logged = _only_run(client, "tiny")  # one MLflow run for the run folder
    assert logged.info.status == "FINISHED" and logged.data.tags["c2f.resumed_after_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_top1")] == [1, 2]
    run(tmp_path / "other", epochs=1, **kw)  # another run folder: its own MLflow run
    assert len(client.search_runs([logged.info.experiment_id])) == 2


class _FakeWandb:
    """Records ``wandb.init``'s arguments; just enough of a run for WandbLogger."""

    def __init__(self) -> None:
        self.inits: list[dict] = []

    def init(self, **kw):  # type: ignore[no-untyped-def]
        self.inits.append(kw)
        run_id = kw.get("id") or f"run{len(self.inits)}"
        return type("Run", (), {"id": run_id, "define_metric": lambda *a, **k: None, "log": lambda *a, **k: None,
                                "save": lambda *a, **k: None, "finish": lambda *a, **k: None,
                                "log_artifact": lambda *a, **k: None})()

    class Artifact:
        def __init__(self, *a, **k) -> None:
            pass

        def add_file(self, *a, **k) -> None:
            pass


def test_a_resumed_run_continues_its_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "run"
    run(run_dir, epochs=1, loggers=["wandb"])
    run(run_dir, epochs=2, resume=True, loggers=["wandb"])
    assert "id" not in fake.inits[0]
    assert fake.inits[1]["id"] == "run1" and fake.inits[1]["resume"] == "allow"

"""The command line end to end on a tiny Fashion-MNIST written in the real IDX format."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coarse2fine.cli import main
from coarse2fine.data.idx import write_idx

CLASSES = 10


def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright 8x8 block at a class-specific place on a noisy background (learnable)."""
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 7 * (c // 4), 2 + 6 * (c % 4)
        images[i, r : r + 8, col : col + 6] = 230
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 100)):
        images, labels = _images(n, rng)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _train_args(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        "configs/fashion_mnist_vgg.yaml",
        "--name",
        name,
        "--quiet",
        "--set",
        f"data.root={root}",
        "--set",
        f"out_dir={out}",
        "--set",
        "train.epochs=2",
        "--set",
        "data.batch_size=50",
        "--set",
        "schedule.name=constant",
        "--set",
        "optim.lr=0.05",
        "--set",
        "train.deterministic=true",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(_train_args(fmnist_root, out, "tiny")) == 0
    return out / "tiny"


def test_train_writes_the_run_folder(trained_run: Path) -> None:
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "best.pt").is_file() and (ckpts / "last.pt").is_file()
    metrics = json.loads((trained_run / "test_metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["num_samples"] == 100
    assert (trained_run / "test_confusion.png").stat().st_size > 0
    assert (trained_run / "metrics.csv").read_text().count("\n") >= 3  # header + 2 epochs
    report = json.loads((trained_run / "report.json").read_text())
    assert report["best_epoch"] in (1, 2)
    # the stored checkpoint is loadable without pickled code
    ckpt = torch.load(ckpts / "best.pt", weights_only=True)
    assert ckpt["classes"][0] == "T-shirt/top" and len(ckpt["classes"]) == CLASSES


def test_training_learns_the_tiny_problem(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "test_metrics.json").read_text())
    assert metrics["top1"] > 0.5  # chance is 0.1


def test_eval_center_matches_training_report(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    assert main(["eval", "--checkpoint", str(best), "--quiet", "--out", str(trained_run / "ev")]) == 0
    ours = json.loads((trained_run / "ev" / "test_center_metrics.json").read_text())
    train_time = json.loads((trained_run / "test_metrics.json").read_text())
    assert ours["top1"] == pytest.approx(train_time["top1"])
    assert "top-1" in capsys.readouterr().out


def test_predict_prints_top5(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, _ = _images(CLASSES, np.random.default_rng(1))
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(images[i]).convert("RGB").save(p)  # colour input is converted to the model's mode
        paths.append(str(p))
    best = trained_run / "checkpoints" / "best.pt"
    assert main(["predict", *paths, "--checkpoint", str(best), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for p in paths:
        ranked = out[p]
        assert len(ranked) == 5
        probs = [r["probability"] for r in ranked]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5


def test_resume_continues_a_finished_run(fmnist_root: Path, tmp_path: Path) -> None:
    assert main(_train_args(fmnist_root, tmp_path, "r", "--set", "train.epochs=1")) == 0
    assert main(_train_args(fmnist_root, tmp_path, "r", "--set", "train.epochs=2", "--resume")) == 0
    lines = (tmp_path / "r" / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 3  # header + epoch 1 + epoch 2, epoch 1 not repeated


def test_unknown_config_key_exits_2(fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_train_args(fmnist_root, tmp_path, "bad", "--set", "train.epochz=3"))
    assert code == 2
    err = capsys.readouterr().err
    assert "epochz" in err and "epochs" in err
    assert not (tmp_path / "bad").exists()


def test_missing_logger_package_exits_2_and_writes_nothing(
    fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as when it is not installed
    assert main(_train_args(fmnist_root, tmp_path, "wb", "--set", "train.loggers=[csv, wandb]")) == 2
    err = capsys.readouterr().err
    assert "train.loggers" in err and "pip install wandb" in err
    assert not (tmp_path / "wb").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_logger_of_a_recipe_stores_its_config_in_the_run_folder(
    fmnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient  # optional dependency

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(_train_args(fmnist_root, tmp_path, "mlf", "--set", "train.loggers=[csv, mlflow]")) == 0
    client = MlflowClient(tracking_uri=(tmp_path / "mlf" / "mlruns").as_uri())  # the default store
    experiment = client.get_experiment_by_name("mlf")  # the run's name
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["name"] == "mlf" and logged.data.params["optim.lr"] == "0.05"
    assert {"config.yaml", "metrics.csv", "checkpoints"} <= {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert len(client.get_metric_history(logged.info.run_id, "val_top1")) == 2


def test_unknown_model_name_exits_2(fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train_args(fmnist_root, tmp_path, "m", "--set", "model.name=vgg_tiny_nonexistent")) == 2
    assert "vgg_tiny_nonexistent" in capsys.readouterr().err


def test_missing_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = _train_args(empty, tmp_path, "nodata")
    # point at a dataset kind that is searched only where we say: a folder tree that is empty
    args += ["--set", "data.name=folder"]
    assert main(args) == 2
    assert str(empty) in capsys.readouterr().err


def test_truncated_idx_file_exits_2(fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in fmnist_root.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = bad / "train-images-idx3-ubyte"
    import gzip

    raw.write_bytes(gzip.decompress((bad / "train-images-idx3-ubyte.gz").read_bytes())[:5000])
    (bad / "train-images-idx3-ubyte.gz").unlink()
    assert main(_train_args(bad, tmp_path, "t")) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_eval_with_checkpoint_for_other_classes_exits_2(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["classes"] = ckpt["classes"][:5]
    bad = tmp_path / "other.pt"
    torch.save(ckpt, bad)
    assert main(["eval", "--checkpoint", str(bad), "--quiet"]) == 2
    assert "other.pt" in capsys.readouterr().err


def test_models_lists_parameters_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--filter", "vgg_small"]) == 0
    out = capsys.readouterr().out
    assert "vgg_small_bn" in out and "GFLOPs" in out


def test_python_dash_m_entry_point() -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "coarse2fine", "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "train" in res.stdout


@pytest.mark.parametrize("protocol", ["dense", "multicrop", "dense+multicrop"])
def test_eval_protocols_and_fusion(trained_run: Path, protocol: str, capsys: pytest.CaptureFixture[str]) -> None:
    best = str(trained_run / "checkpoints" / "best.pt")
    out = trained_run / f"ev_{protocol}"
    args = ["eval", "--checkpoint", best, "--checkpoint", best, "--protocol", protocol, "-q", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 model(s)" in text
    metrics = json.loads((out / f"test_{protocol.replace('+', '_')}_metrics.json").read_text())
    assert metrics["num_samples"] == 100 and metrics["top1"] > 0.3  # the model learned; chance is 0.1
    if protocol == "multicrop":
        assert "150 view(s)" in text  # 5x5 crops x 2 flips x 3 scales


def test_eval_unknown_protocol_is_refused(trained_run: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(trained_run / "checkpoints" / "best.pt"), "--protocol", "tencrop"])
    assert exc.value.code == 2


def test_finetune_from_a_checkpoint_keeps_its_weights(fmnist_root: Path, trained_run: Path, tmp_path: Path) -> None:
    """Fine-tuning at a new scale (METHODS.md §1: S=384 from S=256): --pretrained-file takes a training checkpoint."""
    best = trained_run / "checkpoints" / "best.pt"
    args = _train_args(fmnist_root, tmp_path, "ft", "--pretrained-file", str(best), "--set", "train.epochs=1")
    args += ["--set", "optim.lr=0.0", "--set", "optim.weight_decay=0.0", "--set", "data.pad=4"]
    assert main(args) == 0
    source = torch.load(best, weights_only=True)["model"]
    tuned = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)["model"]
    convs = [k for k in source if k.endswith("weight") and source[k].dim() == 4]
    assert convs
    for k in convs:  # lr 0: the loaded weights are kept exactly
        assert torch.equal(source[k], tuned[k]), k


def test_bad_images_skip_reports_paths_at_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An image folder with a corrupt and a zero-byte file: `bad_images: skip` trains and lists them."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(["cat", "dog"]):
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 80, size=(16, 16, 3), dtype=np.uint8)
                arr[:, c * 8 : c * 8 + 8] = 230
                Image.fromarray(arr).save(folder / f"{i}.png")
    corrupt = tmp_path / "tree" / "train" / "cat" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    empty = tmp_path / "tree" / "train" / "dog" / "empty.jpg"
    empty.write_bytes(b"")
    args = [
        "train", "--config", "configs/fashion_mnist_vgg.yaml", "--name", "folder", "--quiet",
        "--set", f"out_dir={tmp_path / 'runs'}", "--set", "data.name=folder", "--set", f"data.root={tmp_path / 'tree'}",
        "--set", "data.image_size=16", "--set", "data.train_scale=16", "--set", "data.val_fraction=0.25",
        "--set", "data.batch_size=6", "--set", "train.epochs=1", "--set", "model.kwargs={hidden: [16]}",
        "--set", "data.bad_images=skip",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 2 unreadable image(s)" in out
    assert str(corrupt) in out and str(empty) in out
    # the default policy refuses the same tree, naming a bad file
    assert main([*args[:-2], "--set", "data.bad_images=error", "--name", "folder_err"]) == 2
    err = capsys.readouterr().err
    assert "corrupt.png" in err or "empty.jpg" in err


def test_fusion_of_checkpoints_with_other_classes_exits_2(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = trained_run / "checkpoints" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["classes"] = [f"other{i}" for i in range(CLASSES)]
    other = tmp_path / "renamed.pt"
    torch.save(ckpt, other)
    assert main(["eval", "--checkpoint", str(best), "--checkpoint", str(other), "-q"]) == 2
    err = capsys.readouterr().err
    assert "renamed.pt" in err and "class 0 is" in err

"""``c2f predict`` on files, folders and globs: sorted rows, probabilities, CSV / JSON lines, bad images,
HD-CNN's coarse columns and HERBS' heads, and ``--out`` refused before any work."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coarse2fine.cli import main
from coarse2fine.data import load_image
from coarse2fine.engine.objective import logits_of
from coarse2fine.errors import ConfigError, DataError
from coarse2fine.models import register_model, unregister_model
from coarse2fine.recipes import load_trained, outputs
from coarse2fine.recipes.predict import PredictRequest, find_images, predict
from helpers.checkpoints import CLASSES, image_tree, make_checkpoint, tiny_block, write_image


@pytest.fixture(scope="module", autouse=True)
def tiny_blocks() -> Iterator[None]:
    register_model("test_tiny_block", tiny_block, replace=True)
    yield
    unregister_model("test_tiny_block")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "tiny": make_checkpoint(root / "tiny.pt", "tiny"),
        "plain_memory": make_checkpoint(root / "plain.pt", "plain", in_memory=True),  # Fashion-MNIST-like
        "herbs": make_checkpoint(root / "herbs.pt", "herbs"),
        "hdcnn": make_checkpoint(root / "hdcnn.pt", "hdcnn", overrides=["hdcnn.beta=1.0"]),
        "skip": make_checkpoint(root / "skip.pt", "tiny", overrides=["data.bad_images=skip"]),
    }


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[str], Path]:
    good, corrupt = image_tree(tmp_path / "imgs")
    return tmp_path / "imgs", good, corrupt


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_find_images_walks_folders_and_globs(tree: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    root, good, corrupt = tree
    everything = sorted([*good, str(corrupt)])
    assert find_images([str(root)]) == everything  # recursive, no hidden file, no .txt
    jpg, one, three = (str(root / p) for p in ("a/deep/er/two.jpg", "a/one.png", "b/three.png"))
    assert find_images([str(root / "**" / "*.jpg")]) == [jpg]
    assert find_images([three, str(root / "a" / "*.png"), three]) == [one, three]  # deduplicated
    assert find_images([str(root / "b" / "notes.txt")]) == [str(root / "b" / "notes.txt")]  # named: taken
    with pytest.raises(DataError, match="no such file"):
        find_images([str(root / "missing.png")])
    with pytest.raises(DataError, match="no file matches"):
        find_images([str(root / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        find_images([str(tmp_path / "empty")])


def test_csv_rows_sorted_with_probabilities_summing_to_one(
    ckpts: dict[str, Path], tree: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, good, corrupt = tree
    out = tmp_path / "predictions.csv"
    args = ["predict", str(root), "--checkpoint", str(ckpts["tiny"]), "--topk", "6", "--bad-images", "skip"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {len(good)} predictions" in captured.out
    assert "skipped 1 unreadable image" in captured.err and str(corrupt) in captured.err
    rows = _csv(out)
    header = list(rows[0])
    assert header[:5] == ["path", "class_1", "probability_1", "class_2", "probability_2"] and len(header) == 13
    assert [r["path"] for r in rows] == good  # sorted, the corrupt one left out
    for r in rows:
        probs = [float(r[f"probability_{i}"]) for i in range(1, 7)]
        assert sorted(probs, reverse=True) == probs
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert sorted(r[f"class_{i}"] for i in range(1, 7)) == sorted(CLASSES)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_predictions_are_the_models_own(ckpts: dict[str, Path], tree: tuple[Path, list[str], Path]) -> None:
    _, good, _ = tree
    trained = load_trained(ckpts["tiny"])
    result = predict(PredictRequest(good, str(ckpts["tiny"]), topk=3, workers=0, progress=False), trained)
    transform = trained.eval_transform()
    for row, path in zip(result.rows, good):
        with torch.no_grad():
            probs = torch.softmax(logits_of(trained.model(transform(load_image(path))[None])), 1)[0]
        vals, idx = probs.topk(3)
        assert row.path == path and [c for c, _ in row.top] == [CLASSES[i] for i in idx]
        assert [p for _, p in row.top] == pytest.approx(vals.tolist(), abs=1e-6)


def test_bad_images_error_names_the_file_and_writes_nothing(
    ckpts: dict[str, Path], tree: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, corrupt = tree
    out = tmp_path / "p.csv"
    assert main(["predict", str(root), "--checkpoint", str(ckpts["tiny"]), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(corrupt) in err and "--bad-images skip" in err
    assert not out.exists()
    # the checkpoint's data.bad_images is the default: this one skips
    assert main(["predict", str(root), "--checkpoint", str(ckpts["skip"]), "--out", str(out), "-q"]) == 0
    assert str(corrupt) in capsys.readouterr().err and out.is_file()


def test_workers_read_and_skip_in_other_processes(ckpts: dict[str, Path], tree: tuple[Path, list[str], Path]) -> None:
    root, good, corrupt = tree
    req = PredictRequest([str(root)], str(ckpts["tiny"]), workers=2, batch_size=2, bad_images="skip", progress=False)
    result = predict(req)
    assert [r.path for r in result.rows] == good and list(result.skipped) == [str(corrupt)]


def test_json_lines_to_a_file_and_to_the_screen(
    ckpts: dict[str, Path], tree: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, good, _ = tree
    out = tmp_path / "x.jsonl"
    assert main(["predict", *good, "--checkpoint", str(ckpts["plain_memory"]), "--out", str(out), "-q"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in lines] == good and all(len(r["top"]) == 5 for r in lines)
    capsys.readouterr()
    assert main(["predict", *good, "--checkpoint", str(ckpts["plain_memory"]), "--format", "jsonl", "-q"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == lines


def test_table_and_json_on_the_screen(
    ckpts: dict[str, Path], tree: tuple[Path, list[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, good, _ = tree
    assert main(["predict", *good[:2], "--checkpoint", str(ckpts["tiny"]), "--topk", "2", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == good[0] and lines[3] == good[1] and lines[1].strip().endswith(tuple(CLASSES))
    assert main(["predict", *good[:2], "--checkpoint", str(ckpts["tiny"]), "--json", "-q"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert list(ranked) == good[:2] and len(ranked[good[0]]) == 5


def test_hdcnn_adds_the_coarse_group_and_components_run(
    ckpts: dict[str, Path], tree: tuple[Path, list[str], Path], tmp_path: Path
) -> None:
    _, good, _ = tree
    out = tmp_path / "h.csv"
    base = ["predict", *good, "--checkpoint", str(ckpts["hdcnn"]), "--topk", "6", "-q"]
    assert main([*base, "--out", str(out), "--beta", "none"]) == 0
    rows = _csv(out)
    assert {"coarse", "coarse_probability", "components_run"} <= set(rows[0])
    for r in rows:
        assert r["coarse"] in {"g0", "g1", "g2", "g3"} and 0.25 <= float(r["coarse_probability"]) <= 1.0
        assert r["components_run"] == "2"  # every runnable component; the one-class sets need no network
        assert sum(float(r[f"probability_{i}"]) for i in range(1, 7)) == pytest.approx(1.0, abs=1e-5)
    assert main([*base, "--out", str(out)]) == 0  # the checkpoint's beta = 1: the top component only
    assert all(int(r["components_run"]) <= 1 for r in _csv(out))


def test_herbs_heads(ckpts: dict[str, Path], tree: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    _, good, _ = tree
    out = tmp_path / "herbs.jsonl"
    assert main(["predict", *good, "--checkpoint", str(ckpts["herbs"]), "--heads", "--out", str(out), "-q"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    heads = lines[0]["heads"]
    assert "combiner" in heads and all(h["class"] in CLASSES and 0 < h["probability"] <= 1 for h in heads.values())


def test_wrong_options_are_refused_before_any_work(
    ckpts: dict[str, Path], tree: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, good, _ = tree
    ckpt = str(ckpts["tiny"])
    cases = [
        (["--out", str(tmp_path / "missing" / "p.csv")], "does not exist"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--beta", "2"], "HD-CNN"),
        (["--heads"], "no extra heads"),
        (["--topk", "0"], "--topk"),
        (["--json", "--out", str(tmp_path / "p.csv")], "--format jsonl"),
    ]
    before = sorted(tmp_path.iterdir())
    for extra, words in cases:
        assert main(["predict", *good, "--checkpoint", ckpt, "-q", *extra]) == 2, extra
        assert words in capsys.readouterr().err, extra
    assert sorted(tmp_path.iterdir()) == before


def test_predict_reads_a_safetensors_export(ckpts: dict[str, Path], tmp_path: Path) -> None:
    images = [str(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(3)]
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpts["hdcnn"]), "--out", str(export)]) == 0
    req = dict(topk=3, workers=0, progress=False)
    a = predict(PredictRequest(images, str(ckpts["hdcnn"]), **req)).rows  # type: ignore[arg-type]
    b = predict(PredictRequest(images, str(export), **req)).rows  # type: ignore[arg-type]
    assert [r.path for r in a] == [r.path for r in b] and [r.coarse for r in a] == [r.coarse for r in b]
    for ra, rb in zip(a, b):
        assert [c for c, _ in ra.top] == [c for c, _ in rb.top]
        assert [p for _, p in ra.top] == pytest.approx([p for _, p in rb.top], abs=1e-6)


def test_an_unwritable_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)  # as for a read-only folder (not root)
    with pytest.raises(ConfigError, match="is not writable"):
        outputs.checked_output_file(tmp_path / "p.csv")
    with pytest.raises(ConfigError, match="is not writable"):
        outputs.checked_output_folder(tmp_path / "export")

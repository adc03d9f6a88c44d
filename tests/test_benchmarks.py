"""The benchmark scripts run: the GPU benchmark's tiny CPU mode gives every row with finite numbers, the
throughput ceiling covers every FLOP of a model, the overhead arms train, and the time-to-accuracy
summary reads its curves."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.benchmarks import BENCH, load_benchmark
from helpers.data import write_fashion_mnist


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]  # without the header


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # ~15 s of CPU: 16 arms, four of them traced by torch.compile
def test_gpu_throughput_tiny_mode_has_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    gpu = load_benchmark("gpu_throughput")
    assert gpu.main(["--tiny", "--cpu"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    expected = {(m, c, loop) for m in gpu.CASES for c in ("no", "yes") for loop in ("engine", "bare")}
    assert {(r[0], r[3], r[4]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        rate, first = float(r[5].replace(",", "")), float(r[8])
        assert math.isfinite(rate) and rate > 0 and math.isfinite(first), r
        if r[4] == "engine":
            assert math.isfinite(float(r[6])) and float(r[6]) > 0, r  # engine / bare
        if r[3] == "yes":
            assert math.isfinite(float(r[7])) and float(r[7]) > 0, r  # compiled / eager


def test_gpu_throughput_reports_an_arm_that_fails(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    gpu = load_benchmark("gpu_throughput")

    def broken(tiny: bool):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setitem(gpu.CASES, "broken", gpu.Case(broken, 32, 2, 5))
    assert gpu.main(["--tiny", "--cpu", "--models", "broken", "hdcnn_nin", "--compile", "off"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [(r[0], r[5]) for r in rows[:2]] == [("broken", "failed (RuntimeError)")] * 2
    assert all(float(r[5]) > 0 for r in rows[2:]) and len(rows) == 4  # the other model still ran


def test_partial_sets_cover_every_class() -> None:
    gpu = load_benchmark("gpu_throughput")
    sets = gpu._partial_sets(100, 4)
    assert len(sets) == 4 and set().union(*sets) == set(range(100))
    assert all(len(set(a) & set(b)) > 0 for a, b in itertools.pairwise(sets))  # neighbours overlap


def test_throughput_ceiling_covers_the_models_flops() -> None:
    tp = load_benchmark("throughput")
    torch.set_num_threads(1)
    case = tp.replace(tp.CASES["vgg_small_bn"], batch=4)
    arms = [tp.build_arms("vgg_small_bn", case, tp.parse_variant(v), 10, torch.channels_last, 0)
            for v in ("fp32", "batch=8")]
    tp.time_in_turns(arms, rounds=2, iters=1)
    for a in arms:
        row = tp.ceiling_row(a)
        assert row["covered"] == pytest.approx(1.0, rel=1e-6)  # convs + linears are all the counted FLOPs
        assert all(math.isfinite(v) and v > 0 for v in row.values()), row
    assert arms[1].batch == 8 and len(arms[0].layers) == 8  # 6 convs + 2 linears
    with pytest.raises(SystemExit, match="unknown variant"):
        tp.parse_variant("fp64")


def test_overhead_arms_train_on_a_generated_jpeg_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    oh = load_benchmark("overhead")
    argv = ["--data", "folder", "--folder-root", str(tmp_path / "tree"), "--folder-images", "6", "--limit-train", "0",
            "--epochs", "1", "--repeats", "1", "--threads", "1", "--no-progress",
            "--set", "data.workers=0", "--set", "data.batch_size=8", "--set", "data.image_size=32",
            "--set", "data.train_scale=[36]"]
    assert oh.main(argv) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert [r[0] for r in rows] == ["engine", "bare"]
    assert all(float(v) > 0 for r in rows for v in r[1:]), rows
    assert "engine / bare, per epoch, CPU clock" in out


def test_time_to_accuracy_summary() -> None:
    fm = load_benchmark("fashion_mnist")

    def rows(flips: list[float], cpu_per_epoch: float) -> list[dict[str, float]]:
        return [{"epoch": i + 1, "minutes": cpu_per_epoch * (i + 1), "cpu_minutes": cpu_per_epoch * (i + 1),
                 "train_top1": 90.0, "val_top1": f, "test_top1": f - 0.3, "test_flip": f} for i, f in enumerate(flips)]

    ref = rows([92.0, 93.1, 93.4], 1.0)
    fast = rows([92.5, 93.6, 93.7, 93.8], 0.6)
    assert fm.first_reaching(ref, 93.5) is None and fm.first_reaching(fast, 93.5)["epoch"] == 2
    cfg = {"model": {"name": "m"}, "data": {"batch_size": 1}, "optim": {"lr": 0.1},
           "train": {"epochs": 3, "amp": "off", "threads": 1}}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fm.summary([("ref", cfg, ref), ("fast", cfg, fast)])
    table = _table_rows(out.getvalue())
    assert [(r[0], r[-1]) for r in table] == [("ref", "no"), ("fast", "yes")]
    args = fm.parse_args(["--arm", "a", "train.epochs=2", "--arm", "b", "train.amp=bf16"])
    assert args.arm == [["a", "train.epochs=2"], ["b", "train.amp=bf16"]]
    assert isinstance(args, argparse.Namespace)


def test_seed_table_means_spreads_and_paired_deltas(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sd = load_benchmark("seeds")
    runs = [{"rows": [{"arm": "plain", "top1": p}, {"arm": "herbs", "top1": h}]}
            for p, h in ((0.80, 0.82), (0.70, 0.73), (0.75, 0.76))]
    files = []
    for i, run in enumerate(runs):
        files.append(tmp_path / f"s{i}.json")
        files[-1].write_text(json.dumps(run))
    assert sd.main([str(f) for f in files]) == 0
    rows = {r[0]: r for r in _table_rows(capsys.readouterr().out)}
    assert rows["plain"][1] == "3" and rows["plain"][2].startswith("75.00 ± 5.00 (70.00-80.00)")
    assert rows["herbs"][3].startswith("2.00 ± 1.00 (1.00-3.00)")  # paired: +2, +3, +1 points
    assert float(rows["herbs"][4]) == pytest.approx((1 - 0.77) / (1 - 0.75), abs=1e-3)
    assert sd.spread([0.5]) == "50.00"


def test_herbs_ablation_on_a_folder_tree_with_the_selector_off(tmp_path: Path) -> None:
    """``--folder``: a tree's images through the image cache, a carved stratified test part; ``nosel``
    is HERBS without the selector and the combiner that reads its tokens (no dropped or merged loss)."""
    ha = load_benchmark("herbs_ablation")
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for i in range(30):
        (root / "abc"[i % 3]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "abc"[i % 3] / f"{i}.png")
    out = tmp_path / "rows.json"
    ha.main(["--folder", str(root), "--test-fraction", "0.2", "--arms", "plain,nosel", "--epochs", "1",
             "--batch-size", "8", "--timing-batch", "4", "--timing-reps", "1", "--threads", "1", "--amp", "bf16",
             "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows] == ["plain", "nosel"]
    assert all(0.0 <= r["top1"] <= 1.0 and r["params"] > 0 for r in rows)
    args = ha.parse_args(["--folder", str(root), "--arms", "nosel"])
    args.size, args.chans = 32, 3
    model, _, _ = ha.make_arm("nosel", args, 3)
    assert model.selector is None and model.combiner is None


@pytest.mark.slow  # ~40 s of CPU: two blocks and two HD-CNNs, one epoch each on 200 images
def test_hdcnn_seeds_rows_share_the_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # it imports benchmarks/seeds.py as a script does
    hs = load_benchmark("hdcnn_seeds")
    write_fashion_mnist(tmp_path / "fm", n_train=200, n_test=40)
    argv = ["--seed", "3", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "s3.json"),
            "--set", f"data.root={tmp_path / 'fm'}", "--set", "hdcnn.block_epochs=1", "--set", "hdcnn.fine_epochs=1",
            "--set", "hdcnn.finetune_epochs=1", "--set", "data.batch_size=32", "--set", "hdcnn.num_coarse=3"]
    assert hs.main(argv) == 0
    result = json.loads((tmp_path / "s3.json").read_text())
    assert [r["variant"] for r in result["rows"]] == [
        "building block", "average of two building blocks", "HD-CNN, spectral hierarchy", "HD-CNN, auto hierarchy"]
    assert result["test_images"] == 40 and set(result["groups"]) == {"spectral", "auto"}
    methods = result["hierarchy_methods"]
    assert set(methods) == {"spectral", "agglomerative", "affinity", "auto"}
    assert all(0 <= m["confusion_kept"] <= 1 and sum(map(len, m["groups"])) == 10 for m in methods.values())
    seed_dir = tmp_path / "runs" / "seed3"
    assert (seed_dir / "block" / "block.pt").is_file() and (seed_dir / "second_block" / "block.pt").is_file()
    assert not (seed_dir / "auto" / "block.pt").exists()  # the HD-CNNs reuse the seed's block
    first = [r["top1"] for r in result["rows"]]
    assert hs.main(argv) == 0  # every stage cached: the same numbers, nothing trained again
    assert [r["top1"] for r in json.loads((tmp_path / "s3.json").read_text())["rows"]] == first
    capsys.readouterr()
    assert hs.main(["--table", str(tmp_path / "s3.json")]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows[:4]] == [r["variant"] for r in result["rows"]]
    assert {r[0] for r in rows[4:]} >= {"spectral", "agglomerative", "affinity", "auto"}

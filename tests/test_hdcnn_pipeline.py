"""HD-CNN staged pipeline end to end on tiny Fashion-MNIST IDX files: stages, skip, resume, CLI, errors."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from coarse2fine.config import RunConfig, load_config, to_dict
from coarse2fine.data import LocalLabelView
from coarse2fine.engine.checkpoint import load_checkpoint
from coarse2fine.errors import CheckpointError, ConfigError, ModelError
from coarse2fine.hdcnn import HDCNN
from coarse2fine.models import register_model, unregister_model
from coarse2fine.recipes import hdcnn as pipeline
from helpers.hdcnn import TINY_BLOCK, TinyBlock, make_cfg, tiny_block_builder


def _record_fits(monkeypatch: pytest.MonkeyPatch) -> list[dict]:  # also a MonkeyPatch.context()
    calls: list[dict] = []
    real_fit = pipeline.fit

    def recording_fit(model, objective, *args, **kwargs):  # type: ignore[no-untyped-def]
        run = inspect.signature(real_fit).bind(model, objective, *args, **kwargs).arguments["run"]
        calls.append({"run_dir": run.root.name, "resume": run.resume})
        return real_fit(model, objective, *args, **kwargs)

    monkeypatch.setattr(pipeline, "fit", recording_fit)
    return calls


@pytest.fixture(scope="module", autouse=True)
def tiny_block() -> Iterator[None]:
    """The building block of the recipe is a tiny stand-in (the factory's VGG would be too slow here)."""
    register_model(TINY_BLOCK, tiny_block_builder, replace=True)
    yield
    unregister_model(TINY_BLOCK)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, dict]:
    """One complete pipeline run shared by the tests below (they copy it before changing anything)."""
    tmp = tmp_path_factory.mktemp("hdcnn")
    with pytest.MonkeyPatch.context() as mp:
        cfg = make_cfg(tmp)
        calls = _record_fits(mp)
        report = pipeline.run_pipeline(cfg, progress=False)
    report["fit_calls"] = [c["run_dir"] for c in calls]
    return cfg, report


def test_pipeline_end_to_end(finished: tuple[RunConfig, dict], tiny_block: None) -> None:
    cfg, report = finished
    run = cfg.run_dir
    assert report["fit_calls"] == ["block", "k0", "k1", "k2", "finetune"]
    for name in (
        "block.pt",
        "hierarchy.json",
        "hierarchy.png",
        "hdcnn_init.pt",
        "hdcnn.pt",
        "hdcnn_report.json",
        "beta_tradeoff.png",
    ):
        assert (run / name).is_file(), name
    assert all((run / "fine" / f"component_{k}.pt").is_file() for k in range(3))
    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(cfg)  # the resolved recipe (method: hdcnn)
    saved = json.loads((run / "hdcnn_report.json").read_text())
    assert saved["hdcnn"]["top1"] == report["hdcnn"]["top1"]
    assert len(report["groups"]) == 3
    assert sorted(c for g in report["groups"] for c in g) == sorted(report["classes"])
    assert report["hdcnn"]["num_samples"] == 60
    assert 0.0 <= report["coarse"]["coarse_component_accuracy"] <= 1.0
    sweep = {row["beta"]: row for row in report["beta_sweep"]}
    assert sweep[None]["components_run"] == 3.0
    assert 1.0 <= sweep[1.0]["components_run"] <= sweep[2.0]["components_run"] <= 3.0
    assert report["cost"]["hdcnn_parameters"] > report["cost"]["block_parameters"]
    assert report["cost"]["hdcnn_peak_bytes"] > 0
    assert abs(sum(report["coarse_targets"]) - 1) < 1e-9
    # the fine components were trained on the local labels of their partial sets
    h = json.loads((run / "hierarchy.json").read_text())
    comp = load_checkpoint(run / "fine" / "component_0.pt")
    assert comp["classes"] == [h["class_names"][j] for j in h["partial_sets"][0]]

    # the checkpoint rebuilds through the lead's build.load_trained (method: hdcnn)
    from coarse2fine.recipes import load_trained

    trained = load_trained(run / "hdcnn.pt")
    assert isinstance(trained.model, HDCNN) and trained.classes == report["classes"]
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(trained.model(x)["probs"].sum(1), torch.ones(2), atol=1e-5)
    ckpt = load_checkpoint(run / "hdcnn.pt")
    assert ckpt["metadata"]["hdcnn"]["branch_stage"] == "stage1" and "data_stats" in ckpt["metadata"]


def copy_finished(finished: tuple[RunConfig, dict], tmp_path: Path, *overrides: str) -> RunConfig:
    """The finished run copied to ``tmp_path/runs/tiny`` and its recipe (same data) with ``overrides``."""
    cfg0 = finished[0]
    shutil.copytree(cfg0.run_dir, tmp_path / "runs" / "tiny")
    return make_cfg(tmp_path, f"data.root={cfg0.data.root}", *overrides)


def test_skip_when_exists_resume_and_cli(
    finished: tuple[RunConfig, dict], tmp_path: Path, tiny_block: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg0, report = finished
    cfg = copy_finished(finished, tmp_path)
    run = cfg.run_dir
    # every stage output exists: nothing is trained again and nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")}
    calls = _record_fits(monkeypatch)
    again = pipeline.run_pipeline(cfg, progress=False)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")} == stamps
    assert again["hdcnn"]["top1"] == report["hdcnn"]["top1"]

    # resume: fine-tuning gets a second epoch -> continues from finetune/checkpoints/last.pt (epoch 1)
    (run / "hdcnn.pt").unlink()
    pipeline.run_pipeline(make_cfg(tmp_path, f"data.root={cfg0.data.root}", "hdcnn.finetune_epochs=2"), progress=False)
    assert calls == [{"run_dir": "finetune", "resume": True}]
    last = load_checkpoint(run / "finetune" / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and [r["epoch"] for r in last["history"]] == [1, 2]
    assert (run / "block.pt").stat().st_mtime_ns == stamps[run / "block.pt"]

    # c2f hdcnn eval on the checkpoint, with its own beta list
    from coarse2fine.cli import main

    out = tmp_path / "eval.json"
    args = ["hdcnn", "eval", "--checkpoint", str(run / "hdcnn.pt"), "--beta", "1.5", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert [r["beta"] for r in json.loads(out.read_text())["beta_sweep"]] == [None, 1.5]


def test_c2f_compress_hdcnn_stores_fine_codes_and_loads_back(
    finished: tuple[RunConfig, dict], tmp_path: Path, tiny_block: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from coarse2fine.cli import main
    from coarse2fine.recipes import load_trained

    cfg, _ = finished
    src = cfg.run_dir / "hdcnn.pt"
    out = tmp_path / "hdcnn_pq.pt"
    layers = ["fine.body.0=2:4:columns", "coarse.body.0=2:4"]
    args = ["compress", "--checkpoint", str(src), "--layers", *layers, "--out", str(out), "--eval", "--quiet"]
    assert main([*args, "--backend", "torch"]) == 0  # batched torch k-means for every part
    text = capsys.readouterr().out
    assert "rear layers (coarse + fine components)" in text and "fine 2" in text and "test top-1" in text
    ckpt = load_checkpoint(out)
    assert ckpt["metadata"]["compression"]["fine.body.0.weight"] == [2, 4, "columns"]
    assert "fine.body__0__weight" not in ckpt["model"]  # stored as K code tables + centres
    assert ckpt["model"]["fine.body__0__weight__codes"].dtype == torch.uint8
    # the compressed checkpoint rebuilds and runs with the quantised weights
    trained = load_trained(out)
    w = trained.model.fine.stacked()[0]["body.0.weight"]
    assert all(torch.unique(w[k].reshape(8, -1)[:2].t(), dim=0).shape[0] <= 4 for k in range(3))
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(trained.model(x)["probs"].sum(1), torch.ones(2), atol=1e-5)
    after = ckpt["compression_eval"]["after"]["top1"]
    again = main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev")])
    assert again == 0 and f"{100 * after:.2f}" in capsys.readouterr().out
    sweep = tmp_path / "sweep.json"  # conditional execution on the compressed model
    assert main(["hdcnn", "eval", "--checkpoint", str(out), "--beta", "1.5", "--out", str(sweep), "--quiet"]) == 0
    rows = json.loads(sweep.read_text())["beta_sweep"]
    assert rows[0]["top1"] == pytest.approx(after) and rows[1]["components_run"] <= 3.0
    # a layer name without its part is a clear error
    assert main(["compress", "--checkpoint", str(src), "--layers", "body.0=2:4"]) == 2
    assert "shared., coarse. or fine." in capsys.readouterr().err


def test_cli_fit_reuses_block_checkpoint(
    finished: tuple[RunConfig, dict],
    tmp_path: Path,
    tiny_block: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from coarse2fine.cli import main

    block = finished[0].run_dir / "block.pt"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(make_cfg(tmp_path, "name=reuse", f"data.root={finished[0].data.root}"))))
    calls = _record_fits(monkeypatch)
    sets = [f"hdcnn.block_checkpoint={block}", "hdcnn.finetune_epochs=0", "hdcnn.fine_epochs=0", "hdcnn.beta_sweep=[]"]
    argv = ["hdcnn", "fit", "--config", str(recipe), "--quiet"]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 0
    assert calls == []  # block reused, no fine-component or fine-tuning epochs
    report = json.loads((tmp_path / "runs" / "reuse" / "hdcnn_report.json").read_text())
    assert report["block_source"] == str(block)
    assert report["block"]["top1"] == finished[1]["block"]["top1"]
    out = capsys.readouterr().out
    assert "Learnt coarse categories" in out and "| building block |" in out and "| HD-CNN |" in out
    assert all(name in out for group in report["groups"] for name in group)
    # a bad override is a clean error (exit status 2), nothing written
    assert main([*argv, "--set", "hdcnn.num_coarse=0"]) == 2
    assert "hdcnn.num_coarse" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "stage", "difference"),
    [
        ("hdcnn.num_coarse=2", "hierarchy.json", "hdcnn.num_coarse = 3 there, 2 now"),
        ("hdcnn.gamma=2", "hierarchy.json", "hdcnn.gamma = 5.0 there, 2.0 now"),
        ("optim.lr=0.1", "block.pt", "optim.lr = 0.05 there, 0.1 now"),
        ("data.limit_train=100", "block.pt", "data.limit_train = None there, 100 now"),
        ("hdcnn.fine_lr=0.01", "component_0.pt", "hdcnn.fine_lr = None there, 0.01 now"),
        ("hdcnn.coarse_targets=aggregation", "hdcnn_init.pt", "hdcnn.coarse_targets = 'paper' there, 'aggregation'"),
        ("hdcnn.consistency_weight=5", "hdcnn.pt", "hdcnn.consistency_weight = 20.0 there, 5.0 now"),
    ],
)
def test_rerun_with_other_settings_is_refused_naming_them(
    finished: tuple[RunConfig, dict],
    tmp_path: Path,
    tiny_block: None,
    monkeypatch: pytest.MonkeyPatch,
    override: str,
    stage: str,
    difference: str,
) -> None:
    """Issue #16: a stage made with other settings is never reused silently as this run's."""
    cfg = copy_finished(finished, tmp_path, override)
    stamps = {p: p.stat().st_mtime_ns for p in cfg.run_dir.rglob("*") if p.is_file()}
    calls = _record_fits(monkeypatch)
    with pytest.raises(ConfigError) as err:
        pipeline.run_pipeline(cfg, progress=False)
    message = str(err.value)
    assert stage in message and difference in message, message
    assert "c2f hdcnn fit --restart" in message and "--set name=<new name>" in message
    assert calls == [] and {p: p.stat().st_mtime_ns for p in cfg.run_dir.rglob("*") if p.is_file()} == stamps


def test_rerun_with_settings_that_change_no_stage_reuses_everything(
    finished: tuple[RunConfig, dict], tmp_path: Path, tiny_block: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_effect = ["hdcnn.beta_sweep=[4.0]", "hdcnn.beta=2.0", "hdcnn.fine_exec=loop", "train.log_every=7"]
    cfg = copy_finished(finished, tmp_path, *no_effect, "train.keep_checkpoints=1", "data.eval_batch_size=20")
    stamps = {p: p.stat().st_mtime_ns for p in cfg.run_dir.rglob("*.pt")}
    calls = _record_fits(monkeypatch)
    report = pipeline.run_pipeline(cfg, progress=False)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in cfg.run_dir.rglob("*.pt")} == stamps
    assert [row["beta"] for row in report["beta_sweep"]] == [None, 4.0]
    # what the stage files record: the settings that made them, none of those above
    record = json.loads((cfg.run_dir / "hierarchy.json").read_text())["meta"]["stage_settings"]
    assert record["hdcnn.num_coarse"] == 3 and record["data.val_fraction"] == 0.2 and record["seed"] == 0
    final = load_checkpoint(cfg.run_dir / "hdcnn.pt")["stage_settings"]
    assert final["hdcnn.finetune_epochs"] == 1 and final["hdcnn.block_epochs"] == 1 and final["optim.lr"] == 0.05
    assert not {"hdcnn.beta", "hdcnn.beta_sweep", "hdcnn.fine_exec", "train.device", "train.threads"} & set(final)


def test_restart_retrains_every_stage_with_the_new_settings(
    finished: tuple[RunConfig, dict], tmp_path: Path, tiny_block: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coarse2fine.cli import main

    cfg = copy_finished(finished, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(cfg)))
    calls = _record_fits(monkeypatch)
    argv = ["hdcnn", "fit", "--config", str(recipe), "--set", "hdcnn.num_coarse=2", "--quiet"]
    assert main(argv) == 2  # refused: hierarchy.json was made with K=3
    assert main([*argv, "--restart"]) == 0
    assert [c["run_dir"] for c in calls] == ["block", "k0", "k1", "finetune"]
    assert not any(c["resume"] for c in calls)
    h = json.loads((cfg.run_dir / "hierarchy.json").read_text())
    assert len(h["partial_sets"]) == 2 and h["meta"]["stage_settings"]["hdcnn.num_coarse"] == 2
    calls.clear()
    assert main(argv) == 0 and calls == []  # the same settings again: every stage reused


def test_stage_files_without_a_record_are_reused_with_a_warning(
    finished: tuple[RunConfig, dict],
    tmp_path: Path,
    tiny_block: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from coarse2fine.engine.checkpoint import save_checkpoint

    cfg = copy_finished(finished, tmp_path, "hdcnn.gamma=2")  # unchecked: an old file cannot tell
    run = cfg.run_dir
    for path in [run / "block.pt", *run.glob("fine/component_*.pt"), run / "hdcnn_init.pt", run / "hdcnn.pt"]:
        ckpt = load_checkpoint(path)
        del ckpt["stage_settings"]
        save_checkpoint(ckpt, path)
    h = json.loads((run / "hierarchy.json").read_text())
    del h["meta"]["stage_settings"]
    (run / "hierarchy.json").write_text(json.dumps(h))
    calls = _record_fits(monkeypatch)
    with caplog.at_level("WARNING", logger="coarse2fine.recipes.hdcnn_records"):
        pipeline.run_pipeline(cfg, progress=False)
    assert calls == []
    warned = [r.getMessage() for r in caplog.records if "recorded their settings" in r.getMessage()]
    assert len(warned) == 7 and any("hierarchy.json" in w for w in warned)  # block, hierarchy, 3 F_k, init, final


def test_block_checkpoint_of_another_split_is_refused_unless_allowed(
    finished: tuple[RunConfig, dict],
    tmp_path: Path,
    tiny_block: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from coarse2fine.recipes.hdcnn_records import check_block_split

    block = finished[0].run_dir / "block.pt"
    quick = ["hdcnn.fine_epochs=0", "hdcnn.finetune_epochs=0", "hdcnn.beta_sweep=[]"]
    other = [f"hdcnn.block_checkpoint={block}", "data.val_fraction=0.3", "seed=1", *quick]
    cfg = make_cfg(tmp_path, *other)  # its own copy of the data: another data.root too
    with pytest.raises(ConfigError) as err:
        pipeline.run_pipeline(cfg, progress=False)
    message = str(err.value)
    assert "data.val_fraction = 0.2 there, 0.3 now" in message and "seed = 0 there, 1 now" in message
    assert "data.root" in message and "hdcnn.allow_other_split" in message and "data.name" not in message
    assert not (cfg.run_dir / "hierarchy.json").exists()
    calls = _record_fits(monkeypatch)
    with caplog.at_level("WARNING", logger="coarse2fine.recipes.hdcnn_records"):
        report = pipeline.run_pipeline(make_cfg(tmp_path, *other, "hdcnn.allow_other_split=true"), progress=False)
    assert calls == [] and report["block_source"] == str(block)
    assert "another split" in caplog.text and "data.val_fraction" in caplog.text
    with pytest.raises(ConfigError, match="records no config"):
        check_block_split(cfg, None, "elsewhere.pt")
    check_block_split(finished[0], load_checkpoint(block)["config"], str(block))  # the same split: no error


def test_load_trained_reads_an_old_layout_checkpoint_with_one_class_slots(tmp_path: Path, tiny_block: None) -> None:
    """A checkpoint that stacked a fine component for every partial set (one-class ones included) rebuilds
    through ``load_trained`` (its architecture check sees the converted layout) with the same outputs."""
    from coarse2fine.engine.checkpoint import save_checkpoint
    from coarse2fine.facts import HDCNNFacts, RunFacts
    from coarse2fine.hierarchy import Hierarchy
    from coarse2fine.recipes import load_trained
    from coarse2fine.recipes.models import build_hdcnn_model
    from helpers.hdcnn import old_layout_state

    names = [f"c{j}" for j in range(6)]
    h = Hierarchy(names, [0, 0, 0, 1, 2, 2], [[0, 1, 2], [3], [2, 4, 5]], ["a", "b", "c"])
    cfg = load_config(None, ["method=hdcnn", "model.name=test_tiny_block", "hdcnn.branch_stage=stage1"])
    hd = HDCNNFacts(hierarchy=h.to_dict(), branch_stage="stage1", block="test_tiny_block")
    facts = RunFacts(in_chans=1, image_size=8, data_stats={"mean": [0.0], "std": [1.0]}, classes=names, hdcnn=hd)
    model = build_hdcnn_model(cfg, facts).eval()
    with torch.no_grad():
        for p in model.fine.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path / "old_hdcnn.pt"
    state = old_layout_state(model)
    save_checkpoint({"model": state, "config": to_dict(cfg), "classes": names, "metadata": facts.to_dict()}, path)
    trained = load_trained(path)
    assert trained.model.fine.num_components == 2 and state["fine.head__3__weight"].shape[0] == 3
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(trained.model(x)["probs"], model(x)["probs"])


def test_local_label_view() -> None:
    from coarse2fine.data.base import InMemoryDataset

    ds = InMemoryDataset(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), [0, 1, 2, 3, 2, 0], list("abcd"), source="t")
    view = LocalLabelView(ds, [2, 3])
    assert view.classes == ["c", "d"] and len(view) == 3
    assert view.targets.tolist() == [0, 1, 0]
    assert [view[i][1] for i in range(3)] == [0, 1, 0]
    assert np.array_equal(view.indices, [2, 3, 4])


def test_bad_configs(tmp_path: Path, tiny_block: None) -> None:
    with pytest.raises(ConfigError, match="num_coarse=11"):
        pipeline.run_pipeline(make_cfg(tmp_path, "hdcnn.num_coarse=11"), progress=False)
    with pytest.raises(ConfigError, match="beta"):
        pipeline.run_pipeline(make_cfg(tmp_path, "hdcnn.beta=-1"), progress=False)
    with pytest.raises(ConfigError, match=r"hdcnn\.coarse_targets.*'mean'"):
        pipeline.run_pipeline(make_cfg(tmp_path, "hdcnn.coarse_targets=mean"), progress=False)
    with pytest.raises(ModelError, match="stage1"):
        pipeline.run_pipeline(make_cfg(tmp_path, "hdcnn.branch_stage=stage7", "hdcnn.block_epochs=1"), progress=False)
    assert not (tmp_path / "runs").exists()  # refused before the run folder (or its config.yaml) was made


def test_bad_checkpoints(
    finished: tuple[RunConfig, dict], tmp_path: Path, tiny_block: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from coarse2fine.cli import main
    from coarse2fine.engine.checkpoint import save_checkpoint

    # a plain block checkpoint is not an HD-CNN: clean error naming the file, exit 2
    block = finished[0].run_dir / "block.pt"
    assert main(["hdcnn", "eval", "--checkpoint", str(block), "--quiet"]) == 2
    assert "hierarchy" in capsys.readouterr().err
    # a building block of another architecture for these classes
    other = tmp_path / "other.pt"
    save_checkpoint({"model": TinyBlock(10, 1, width=16).state_dict(), "classes": finished[1]["classes"]}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt"):
        pipeline.run_pipeline(make_cfg(tmp_path, f"hdcnn.block_checkpoint={other}"), progress=False)
    assert not (tmp_path / "runs").exists()


def test_peak_memory_on_cpu_counts_activations_and_keeps_stderr_clean() -> None:
    """The CPU measure (profiler allocations) grows with the batch; libkineto's start / stop lines and its
    failed GPU probe do not reach the screen (a fresh process: the log level is read once)."""
    code = (
        "import torch\n"
        "from coarse2fine.hdcnn.evaluation import peak_memory_bytes\n"
        "net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU())\n"
        "print(peak_memory_bytes(net, torch.randn(2, 1, 32, 32)), peak_memory_bytes(net, torch.randn(8, 1, 32, 32)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    small, large = map(int, done.stdout.split())
    assert large >= 4 * 16 * 32 * 32 * 8 > small > 0  # at least the conv output of 8 images, float32
    assert "profiler_start" not in done.stderr and "gpuGetDeviceCount" not in done.stderr, done.stderr

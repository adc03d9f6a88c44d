"""Folder trees as a user has them (issue #14): the one input size, a carved or given test split saved
with the run, symbolic links leaving the root, and the image cache of small-image trees. Every tree is
written by the test as JPEG / PNG files in class folders."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coarse2fine import data as D
from coarse2fine.cli import main
from coarse2fine.config import load_config
from coarse2fine.data import cache as C
from coarse2fine.errors import ConfigError, DataError
from coarse2fine.recipes import SPLIT_CSV, build_datasets, build_loaders, build_model_and_objective

ROOT = Path(__file__).resolve().parents[1]
FOLDER_RECIPE = str(ROOT / "configs" / "folder.yaml")


def write_tree(root: Path, counts: dict[str, int], size: int | tuple[int, int] = 32, seed: int = 0) -> Path:
    """root/<class>/<k>.jpg (even k) or .png (odd k): class c is a bright stripe at a class-specific place."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            w, h = size if isinstance(size, tuple) else (size, size)
            arr = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            arr[:, (c * 7) % w : (c * 7) % w + 5] = 230
            Image.fromarray(arr).save(root / name / f"{k:03d}.{'jpg' if k % 2 == 0 else 'png'}")
    return root


def cfg_for(root: Path, *overrides: str, out: Path | None = None):
    sets = [f"data.root={root}", "data.workers=0", "data.batch_size=8", "data.val_fraction=0.25"]
    if out is not None:
        sets.append(f"out_dir={out}")
    return load_config(FOLDER_RECIPE, [*sets, *overrides])


def read_split(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_carve_test_is_stratified_and_seeded():
    targets = np.repeat(np.arange(3), [10, 20, 30])
    test = D.carve_test(targets, ["a", "b", "c"], 0.1, seed=4)
    assert np.bincount(targets[test]).tolist() == [1, 2, 3]
    assert np.array_equal(test, D.carve_test(targets, ["a", "b", "c"], 0.1, seed=4))
    assert not np.array_equal(test, D.carve_test(targets, ["a", "b", "c"], 0.1, seed=5))


# ---- the one input size ------------------------------------------------------------------------


def test_native_small_size_is_the_input_size_of_model_and_transforms(tmp_path):
    write_tree(tmp_path / "t", {"a": 8, "b": 8}, size=24)
    bundle = build_datasets(cfg_for(tmp_path / "t"))
    assert bundle.image_size == 24 and bundle.in_memory
    assert bundle.train.base.images.shape[1:] == (3, 24, 24)  # decoded into the cache: in memory
    x, _ = next(iter(build_loaders(cfg_for(tmp_path / "t"), bundle).train))
    assert x.shape[1:] == (3, 24, 24)


@pytest.mark.parametrize(
    ("sizes", "overrides", "expected"),
    [
        ([24, 20], [], 32),  # mixed sizes: vgg_small_bn's default input
        ([80, 80], [], 32),  # one size but not small: the model's default
        ([80, 80], ["model.name=vgg11_bn"], 224),
        ([24, 24], ["model.kwargs={input_size: 28}"], 28),  # a model the user pinned wins over the data
        ([24, 24], [], 24),
        ([24, 20], ["data.image_size=16"], 16),
    ],
)
def test_input_size_from_the_recipe_the_data_or_the_model(tmp_path, sizes, overrides, expected):
    write_tree(tmp_path / "t", {"x": 6}, size=sizes[0])
    write_tree(tmp_path / "t", {"y": 6}, size=sizes[1], seed=1)
    bundle = build_datasets(cfg_for(tmp_path / "t", *overrides))
    assert bundle.image_size == expected
    assert bundle.in_memory == (sizes == [24, 24])  # one small size: cached, in memory
    x, _ = next(iter(build_loaders(cfg_for(tmp_path / "t", *overrides), bundle).train))
    assert x.shape[1:] == (3, expected, expected)


def test_the_model_and_the_transforms_share_the_size(tmp_path):
    """The crash of issue #14: fashion_mnist_vgg.yaml on a 32x32 folder tree built the VGG head for 32 px
    while the transforms cropped 224 (the file datasets' default)."""
    write_tree(tmp_path / "t" / "train", {"a": 6, "b": 6})
    write_tree(tmp_path / "t" / "test", {"a": 2, "b": 2})
    sets = ["data.name=folder", f"data.root={tmp_path / 't'}", "data.batch_size=4", "data.val_fraction=0.25"]
    for cache in ("auto", "off"):
        cfg = load_config(ROOT / "configs" / "fashion_mnist_vgg.yaml", [*sets, f"data.cache={cache}"])
        bundle = build_datasets(cfg)
        model, _ = build_model_and_objective(cfg, bundle.facts())
        x, _ = next(iter(build_loaders(cfg, bundle).train))
        assert bundle.image_size == 32 and model(x).shape == (4, 2)


def test_a_size_mismatch_the_user_asked_for_names_the_keys(tmp_path, capsys):
    write_tree(tmp_path / "t", {"a": 8, "b": 8})
    with pytest.raises(ConfigError) as err:
        build_datasets(cfg_for(tmp_path / "t", "data.image_size=32", "model.kwargs={input_size: 28}"))
    message = str(err.value)
    assert "data.image_size=32" in message and "model.kwargs.input_size=28" in message
    assert "--set data.image_size=28" in message and "--set model.kwargs.input_size=32" in message
    args = ["train", "--config", FOLDER_RECIPE, "--quiet", "--set", f"data.root={tmp_path / 't'}"]
    args += ["--set", f"out_dir={tmp_path / 'runs'}", "--set", "data.image_size=32"]
    assert main([*args, "--set", "model.kwargs={input_size: 28}"]) == 2
    assert "model.kwargs.input_size" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written


# ---- test split of a flat tree --------------------------------------------------------------------


def test_flat_tree_split_is_saved_and_reused_by_eval_and_resume(tmp_path, capsys):
    tree = write_tree(tmp_path / "t", {"a": 10, "b": 10, "c": 10})
    out = tmp_path / "runs"
    args = ["train", "--config", FOLDER_RECIPE, "--quiet", "--name", "r", "--set", f"data.root={tree}"]
    args += ["--set", f"out_dir={out}", "--set", "train.epochs=1", "--set", "data.test_fraction=0.2"]
    args += ["--set", "data.workers=0", "--set", "data.batch_size=8"]
    assert main(args) == 0
    rows = read_split(out / "r" / SPLIT_CSV)
    assert [k for k in rows[0]] == ["path", "label", "split"]
    assert len(rows) == 30 and sorted({r["split"] for r in rows}) == ["test", "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert sorted(r["label"] for r in test_rows) == ["a", "a", "b", "b", "c", "c"]
    assert all((tree / r["path"]).is_file() and r["path"].startswith(r["label"] + "/") for r in rows)
    capsys.readouterr()
    # another seed would carve another split: eval reads the run's split.csv instead
    best = str(out / "r" / "checkpoints" / "best.pt")
    assert main(["eval", "--checkpoint", best, "--quiet", "--set", "seed=7"]) == 0
    assert "test (6 images)" in capsys.readouterr().out
    cfg = cfg_for(tree, "data.test_fraction=0.2", "seed=7")
    bundle = build_datasets(cfg, run_dir=out / "r")
    assert len(bundle.test) == 6
    assert bundle.split is not None and bundle.split.to_csv() == (out / "r" / SPLIT_CSV).read_text()
    other = build_datasets(cfg)  # no run folder: carved afresh with seed 7
    assert other.split is not None and other.split.to_csv() != bundle.split.to_csv()
    # resume with another seed keeps the saved split
    assert main([*args, "--resume", "--set", "train.epochs=2", "--set", "seed=7"]) == 0
    assert read_split(out / "r" / SPLIT_CSV) == rows
    # a changed tree: the first missing file is named
    (tree / test_rows[0]["path"]).unlink()
    assert main(["eval", "--checkpoint", best, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert test_rows[0]["path"] in err and "does not exist" in err


def test_explicit_split_file(tmp_path):
    tree = write_tree(tmp_path / "t", {"a": 6, "b": 6})
    split = tmp_path / "split.csv"
    lines = ["path,label,split"]
    for name in ("a", "b"):
        for k in range(6):
            ext = "jpg" if k % 2 == 0 else "png"
            lines.append(f"{name}/{k:03d}.{ext},{name},{'test' if k < 2 else 'train'}")
    split.write_text("\n".join(lines) + "\n")
    bundle = build_datasets(cfg_for(tree, f"data.split_file={split}"))
    assert len(bundle.test) == 4 and len(bundle.train) + len(bundle.val) == 8
    assert sorted(bundle.test.targets.tolist()) == [0, 0, 1, 1]
    assert bundle.split is not None and bundle.split.to_csv() == split.read_text()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["a/000.jpg,a,test", "a/404.jpg,a,train"], r"line 3: .*a/404\.jpg: image file does not exist"),
        (["a/000.jpg,zebra,train"], r"line 2: unknown class 'zebra'; the classes of .* are a, b"),
        (["a/000.jpg,a,validation"], r"line 2: split 'validation' is not train or test"),
        (["a/000.jpg,a,test", "a/000.jpg,a,train"], r"line 3: a/000\.jpg is listed twice"),
        (["a/000.jpg,a,test", "b/000.jpg,b,train"], r"class\(es\) a have no training image"),
        (["a/000.jpg,a,train", "b/000.jpg,b,train"], r"lists no test image"),
        (["../outside.png,a,train"], r"line 2: .*outside\.png: file lies outside the data root"),
        (["a/far.png,a,train"], r"line 2: .*far\.png: symbolic link to .*outside\.png lies outside the data root"),
    ],
)
def test_bad_split_files_are_refused_before_anything_is_written(tmp_path, capsys, rows, message):
    tree = write_tree(tmp_path / "t", {"a": 4, "b": 4})
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")
    (tree / "a" / "far.png").symlink_to(tmp_path / "outside.png")
    split = tmp_path / "split.csv"
    split.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message) as err:
        build_datasets(cfg_for(tree, f"data.split_file={split}"))
    assert str(split) in str(err.value)
    out = tmp_path / "runs"
    args = ["train", "--config", FOLDER_RECIPE, "--quiet", "--set", f"data.root={tree}", "--set", f"out_dir={out}"]
    assert main([*args, "--set", f"data.split_file={split}"]) == 2
    assert str(split) in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_split_file_names_the_key(tmp_path):
    tree = write_tree(tmp_path / "t", {"a": 6, "b": 6})
    with pytest.raises(DataError, match=r"data\.split_file='.*nope\.csv': the split file does not exist"):
        build_datasets(cfg_for(tree, f"data.split_file={tmp_path / 'nope.csv'}"))


@pytest.mark.parametrize(
    ("counts", "fraction", "message"),
    [
        ({"a": 10, "b": 3}, 0.1, r"data\.test_fraction=0\.1 leaves class 'b' \(3 image\(s\)\) with no test image"),
        ({"a": 10, "b": 1}, 0.9, r"leaves class 'b' \(1 image\(s\)\) with no training image"),
    ],
)
def test_a_test_fraction_that_empties_a_class_is_refused(tmp_path, capsys, counts, fraction, message):
    tree = write_tree(tmp_path / "t", counts)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg_for(tree, f"data.test_fraction={fraction}"))
    out = tmp_path / "runs"
    args = ["train", "--config", FOLDER_RECIPE, "--quiet", "--set", f"data.root={tree}", "--set", f"out_dir={out}"]
    assert main([*args, "--set", f"data.test_fraction={fraction}"]) == 2
    assert "data.test_fraction" in capsys.readouterr().err and not out.exists()


def test_a_tree_with_a_test_folder_keeps_it(tmp_path, caplog):
    write_tree(tmp_path / "t" / "train", {"a": 4, "b": 4})
    write_tree(tmp_path / "t" / "test", {"a": 2, "b": 2})
    bundle = build_datasets(cfg_for(tmp_path / "t"))  # the recipe's test_fraction is not used
    assert len(bundle.test) == 4 and bundle.split is None
    assert "data.test_fraction=0.1 not used" in caplog.text


def test_a_tree_with_only_train_folder_gets_a_carved_test_split(tmp_path):
    write_tree(tmp_path / "t" / "train", {"a": 10, "b": 10})
    bundle = build_datasets(cfg_for(tmp_path / "t"))  # the recipe's test_fraction 0.1
    assert len(bundle.test) == 2 and bundle.split is not None
    assert all(p.startswith("train/") for p in bundle.split.paths)


# ---- symbolic links ----------------------------------------------------------------------------


def test_links_leaving_the_root_are_refused_unless_allowed(tmp_path):
    tree = write_tree(tmp_path / "t", {"a": 5, "b": 5})
    outside = write_tree(tmp_path / "elsewhere", {"c": 5})
    link = tree / "a" / "far.jpg"
    link.symlink_to(outside / "c" / "000.jpg")
    with pytest.raises(DataError) as err:
        D.ImageFolderDataset(tree)
    assert str(link) in str(err.value) and str(outside / "c" / "000.jpg") in str(err.value)
    assert "data.follow_external_links" in str(err.value)
    assert len(D.ImageFolderDataset(tree, follow_external_links=True)) == 11
    link.unlink()
    (tree / "b" / "more").symlink_to(outside / "c", target_is_directory=True)  # a folder outside
    with pytest.raises(DataError, match=r"more: symbolic link to .*elsewhere/c leads outside the data root"):
        D.ImageFolderDataset(tree)
    (tree / "b" / "more").unlink()
    (tree / "d").symlink_to(outside / "c", target_is_directory=True)  # a class folder outside
    with pytest.raises(DataError, match=r"d: symbolic link to .*elsewhere/c leads outside"):
        D.ImageFolderDataset(tree)
    with pytest.raises(DataError, match=r"leads outside the data root"):
        build_datasets(cfg_for(tree))
    assert build_datasets(cfg_for(tree, "data.follow_external_links=true")).classes == ["a", "b", "d"]


def test_links_inside_the_root_keep_working(tmp_path):
    tree = write_tree(tmp_path / "t", {"a": 4, "b": 4})
    (tree / "a" / "copy.jpg").symlink_to(tree / "b" / "000.jpg")
    (tree / "b" / "sub").symlink_to(tree / "a", target_is_directory=True)
    ds = D.ImageFolderDataset(tree)
    assert len(ds) == 5 + 4 + 5  # b/sub lists a's five files again under class b
    linked = tmp_path / "link_to_tree"
    linked.symlink_to(tree, target_is_directory=True)  # the root itself may be a link
    assert len(D.ImageFolderDataset(linked)) == 14


# ---- the image cache ---------------------------------------------------------------------------


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_cache_is_built_reused_and_invalidated(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "t", {"a": 6, "b": 6})
    cache = tmp_path / "cache"
    ds = D.ImageFolderDataset(tree)
    mem = D.cached_images(ds, (32, 32), cache_dir=cache)
    assert mem is not None and mem.images.shape == (12, 3, 32, 32) and mem.targets.tolist() == ds.targets.tolist()
    for i in (0, 7):  # the pixels of the files, in file order
        assert torch.equal(mem.images[i], torch.from_numpy(np.array(D.load_image(ds.paths[i]))).permute(2, 0, 1))
    files = _cache_files(cache)
    assert len(files) == 2 and files[0].endswith(".npy") and files[1].endswith(".json")

    def fail(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(C, "decode", fail)
    again = D.cached_images(D.ImageFolderDataset(tree), (32, 32), cache_dir=cache)  # reused: nothing decoded
    assert again is not None and torch.equal(again.images, mem.images)
    monkeypatch.undo()

    changed = tree / "b" / "001.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt = D.cached_images(D.ImageFolderDataset(tree), (32, 32), cache_dir=cache)
    assert rebuilt is not None and rebuilt.images[7, 0].eq(255).all() and not torch.equal(rebuilt.images, mem.images)
    assert len(_cache_files(cache)) == 2  # the old array is gone
    part = D.ImageFileDataset(list(ds.paths)[:5], ds.targets[:5], ds.classes, source="part")  # another list
    assert D.cached_images(part, (32, 32), cache_dir=cache) is not None and len(_cache_files(cache)) == 4


def test_cache_location_setting_env_and_parallel_decoding(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "t", {"a": 6, "b": 6})
    monkeypatch.setenv("C2F_CACHE_DIR", str(tmp_path / "env"))
    assert D.default_cache_dir() == tmp_path / "env"
    serial = build_datasets(cfg_for(tree))
    assert len(_cache_files(tmp_path / "env")) == 4  # the train and the test split
    parallel = build_datasets(cfg_for(tree, "data.workers=2", f"data.cache_dir={tmp_path / 'mine'}"))
    assert len(_cache_files(tmp_path / "mine")) == 4
    assert torch.equal(serial.train.base.images, parallel.train.base.images)
    off = build_datasets(cfg_for(tree, "data.cache=off"))
    assert not off.train.in_memory and off.in_memory  # files, but the small-image pipeline
    # the same eval batches from files (one image at a time) as from the cache
    a = next(iter(build_loaders(cfg_for(tree), serial).test))[0]
    b = next(iter(build_loaders(cfg_for(tree, "data.cache=off"), off).test))[0]
    assert torch.allclose(a, b)


def test_cache_follows_the_bad_image_policy(tmp_path):
    tree = write_tree(tmp_path / "t", {"a": 6, "b": 6})
    (tree / "a" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = D.ImageFolderDataset(tree, bad_images="skip")
    mem = D.cached_images(ds, (32, 32), cache_dir=tmp_path / "c")
    assert mem is not None and len(mem) == 11 and list(mem.skipped) == [str(tree / "a" / "001.png")]
    assert mem.file_index.tolist() == [0, *range(2, 12)]
    mem2 = D.cached_images(D.ImageFolderDataset(tree, bad_images="skip"), (32, 32), cache_dir=tmp_path / "c")
    assert mem2 is not None and list(mem2.skipped) == list(mem.skipped)  # still listed when read back
    with pytest.raises(DataError, match=r"001\.png: .*data\.bad_images=skip"):
        D.cached_images(D.ImageFolderDataset(tree), (32, 32), cache_dir=tmp_path / "c2")


def test_cache_on_needs_one_size(tmp_path):
    tree = write_tree(tmp_path / "t", {"a": 5}, size=24)
    write_tree(tmp_path / "t", {"b": 5}, size=20)
    with pytest.raises(DataError, match=r"data\.cache=on: the images of .* do not all have one size"):
        build_datasets(cfg_for(tree, "data.cache=on"))
    ds = D.ImageFolderDataset(tree)
    assert D.cached_images(ds, (24, 24), cache_dir=tmp_path / "c") is None  # auto: stays a file dataset
    with pytest.raises(DataError, match=r"b/000\.jpg is 20x20 but the other images are 24x24"):
        D.cached_images(ds, (24, 24), cache_dir=tmp_path / "c", strict=True)


# ---- the newcomer path ---------------------------------------------------------------------------


def test_starter_recipe_trains_a_32px_tree_on_defaults(tmp_path, capsys):
    tree = write_tree(tmp_path / "photos", {"cat": 20, "dog": 20, "owl": 20})
    out = tmp_path / "runs"
    args = ["train", "--config", FOLDER_RECIPE, "--quiet", "--set", f"data.root={tree}"]
    assert main([*args, "--set", f"out_dir={out}", "--set", "train.epochs=1"]) == 0
    run = out / "folder_vgg_small"
    assert (run / "checkpoints" / "best.pt").is_file() and (run / SPLIT_CSV).is_file()
    report = capsys.readouterr().out
    assert "test top-1" in report and "(6 images)" in report
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["metadata"]["image_size"] == 32 and ckpt["metadata"]["in_memory"] is True


def test_processes_wanting_one_cache_entry_take_turns(tmp_path, monkeypatch):
    """The ranks of a torchrun job (here: four forked processes) ask for the same entry at once: one
    decodes, the others wait on the entry's lock and read what it wrote."""
    import multiprocessing

    tree = write_tree(tmp_path / "t", {"a": 6, "b": 6})
    cache, log = tmp_path / "cache", tmp_path / "decoded.log"
    original = C._build

    def counted(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(C, "_build", counted)
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(4)

    def rank() -> None:
        start.wait()
        mem = D.cached_images(D.ImageFolderDataset(tree), (32, 32), cache_dir=cache)
        os._exit(0 if mem is not None and mem.images.shape == (12, 3, 32, 32) else 1)

    procs = [ctx.Process(target=rank) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert len(_cache_files(cache)) == 2  # one entry (the lock file is not one)

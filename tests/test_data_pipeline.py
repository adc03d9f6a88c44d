"""Stratified split, transforms (batched augmentation, VGG scales, statistics) and the loader contract."""

from __future__ import annotations

import json
import os
import time
from typing import ClassVar

import numpy as np
import pytest
import torch

from coarse2fine.data import (
    BatchAugment,
    ImageFolderDataset,
    InMemoryDataset,
    build_loader,
    build_transforms,
    compute_mean_std,
    limit,
    shard_indices,
    stratified_split,
    subset,
)
from coarse2fine.data.transforms import PCAColorShift, large_eval_transform, large_train_transform
from coarse2fine.errors import ConfigError, DataError
from helpers.data import write_folder


def tiny_memory(n_per_class=(6, 10, 4), size=8, channels=3, seed=0) -> InMemoryDataset:
    """Image i is filled with value i (mod 256) so batches can be traced back to indices."""
    n = sum(n_per_class)
    targets = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)])
    order = np.random.default_rng(seed).permutation(n)
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, channels, size, size).clone()
    return InMemoryDataset(images, targets[order], [f"c{i}" for i in range(len(n_per_class))], source="tiny")


# ---- split -------------------------------------------------------------------------------------


def test_stratified_split_per_class_and_seeded():
    ds = tiny_memory((10, 20, 30))
    train, val = stratified_split(ds, 0.2, seed=3)
    assert np.bincount(val.targets).tolist() == [2, 4, 6]
    assert np.bincount(train.targets).tolist() == [8, 16, 24]
    assert set(train.indices).isdisjoint(val.indices) and len(train) + len(val) == len(ds)
    assert train.classes == ds.classes and val.in_memory and val.num_channels == 3
    np.testing.assert_array_equal(val.targets, ds.targets[val.indices])
    again = stratified_split(ds, 0.2, seed=3)[1]
    other = stratified_split(ds, 0.2, seed=4)[1]
    assert np.array_equal(again.indices, val.indices) and not np.array_equal(other.indices, val.indices)
    _, fixed = stratified_split(ds, per_class=3)
    assert np.bincount(fixed.targets).tolist() == [3, 3, 3]
    img, label = val[0]
    assert int(img[0, 0, 0]) == int(val.indices[0]) and label == val.targets[0]


def test_split_errors():
    with pytest.raises(DataError, match=r"class 'c1' has 1 image"):
        stratified_split(tiny_memory((5, 1)), 0.2)
    with pytest.raises(DataError, match=r"class 'c0' has 3 image.*needs at least 4"):
        stratified_split(tiny_memory((3, 9)), per_class=3)
    with pytest.raises(ConfigError, match=r"val_fraction=1.5"):
        stratified_split(tiny_memory(), 1.5)

    class Bare:
        classes: ClassVar[list[str]] = ["a", "b"]
        targets = np.array([0, 1, 2, 1])
        source = "bare.txt"

        def __len__(self):
            return 4

    with pytest.raises(DataError, match=r"bare.txt: label 2 at index 2 is out of range \[0, 2\)"):
        stratified_split(Bare(), 0.5)
    Bare.targets, Bare.classes = np.array([], dtype=np.int64), ["a", "b"]
    with pytest.raises(DataError, match=r"bare.txt: cannot split an empty dataset"):
        stratified_split(Bare(), 0.5)
    Bare.targets, Bare.classes = np.array([0, 1]), ["a", "a"]
    with pytest.raises(DataError, match=r"duplicate class name 'a'"):
        stratified_split(Bare(), 0.5)


def test_limit_and_nested_views():
    ds = tiny_memory((10, 10, 10))
    small = limit(ds, 9, seed=1)
    assert np.bincount(small.targets).tolist() == [3, 3, 3]
    train, _ = stratified_split(ds, 0.5)
    inner = subset(train, [0, 2])
    assert inner.base is ds and inner.indices.tolist() == train.indices[[0, 2]].tolist()
    assert limit(ds, None) is ds


# ---- transforms --------------------------------------------------------------------------------


def test_batch_augment_shapes_randomness_and_determinism():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    aug = BatchAugment([0.5] * 3, [0.25] * 3, size=8, train=True, pad=2)
    a = aug(images, generator=torch.Generator().manual_seed(1))
    b = aug(images, generator=torch.Generator().manual_seed(1))
    c = aug(images, generator=torch.Generator().manual_seed(2))
    assert a.shape == (64, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = (images.float() / 255 - 0.5) / 0.25
    pad_value = (0 - 0.5) / 0.25
    kinds = set()
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), value=pad_value)
    for i in range(64):  # every output is one of the 5x5 x 2 crops/flips of its own input
        match = None
        for oy in range(5):
            for ox in range(5):
                crop = padded[i, :, oy : oy + 8, ox : ox + 8]
                for flip in (False, True):
                    if torch.allclose(a[i], crop.flip(-1) if flip else crop, atol=1e-5):
                        match = (oy, ox, flip)
        assert match is not None, i
        kinds.add(match)
    assert len(kinds) > 10 and {k[2] for k in kinds} == {False, True}
    ev = BatchAugment([0.5] * 3, [0.25] * 3, size=8, train=False)(images)
    assert torch.allclose(ev, plain, atol=1e-5)
    up = BatchAugment([0.5] * 3, [0.25] * 3, size=12, train=True)(images)
    assert up.shape == (64, 3, 12, 12)


def test_large_transforms_scales_and_errors():
    from PIL import Image

    img = Image.new("RGB", (40, 30), (10, 200, 30))
    ev = large_eval_transform([0.5] * 3, [0.5] * 3, crop=16, scale=20)
    out = ev(img)
    assert out.shape == (3, 16, 16) and torch.allclose(out[1], torch.full((16, 16), (200 / 255 - 0.5) / 0.5))
    tr = large_train_transform([0.5] * 3, [0.5] * 3, crop=16, scale=[16, 24], color_shift=0.1)
    torch.manual_seed(0)
    assert {tuple(tr(img).shape) for _ in range(5)} == {(3, 16, 16)}
    with pytest.raises(ConfigError, match=r"train_scale=12 is smaller than the crop image_size=16"):
        large_train_transform([0.5] * 3, [0.5] * 3, crop=16, scale=[12, 24])
    with pytest.raises(ConfigError, match=r"test_scale=8 is smaller"):
        build_transforms({"mean": [0.5] * 3, "std": [0.5] * 3}, in_memory=False, image_size=16, test_scale=8)
    train, evt = build_transforms({"mean": [0.5] * 3, "std": [0.5] * 3}, in_memory=False, image_size=224)
    assert "Resize" in repr(evt) and "256" in repr(evt) and not train.batched
    shift = PCAColorShift(0.1, [0.2, 0.02, 0.004], torch.eye(3).tolist())
    torch.manual_seed(1)
    x = torch.full((3, 4, 4), 0.5)
    y = shift(x)
    assert not torch.equal(x, y) and torch.allclose(y - x, (y - x)[:, :1, :1].expand_as(x))


def test_compute_mean_std_in_memory_and_files(tmp_path):
    ds = tiny_memory((5, 5), size=4)
    stats = compute_mean_std(ds)
    pixels = ds.images.double() / 255
    assert np.allclose(stats["mean"], pixels.mean((0, 2, 3)).numpy())
    assert np.allclose(stats["std"], pixels.std((0, 2, 3), unbiased=False).numpy())
    assert len(stats["eigvec"]) == 3 and stats["eigval"][0] >= stats["eigval"][1] >= stats["eigval"][2]
    json.dumps(stats)
    train, _ = stratified_split(ds, 0.2)
    view_stats = compute_mean_std(train)
    assert np.allclose(view_stats["mean"], (ds.images[train.indices].double() / 255).mean((0, 2, 3)).numpy())
    write_folder(tmp_path, {"a": 3, "b": 3})
    fstats = compute_mean_std(ImageFolderDataset(tmp_path), max_samples=4)
    assert fstats["num_images"] == 4 and len(fstats["mean"]) == 3
    assert abs(fstats["mean"][2] - 7 / 255) < 1e-9  # blue channel is 7 everywhere
    assert fstats["std"][2] == pytest.approx(1 / 255)  # a constant channel's std is floored at one grey level
    gray = compute_mean_std(tiny_memory((4, 4), channels=1))
    assert len(gray["mean"]) == 1 and "eigval" not in gray


# ---- loader ------------------------------------------------------------------------------------


def _epoch(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def test_shard_indices_cover():
    for n, w in [(10, 3), (9, 3), (2, 4)]:
        exact = [shard_indices(n, shuffle=True, seed=1, epoch=2, rank=r, world_size=w, pad=False) for r in range(w)]
        assert sorted(np.concatenate(exact).tolist()) == list(range(n))
        padded = [shard_indices(n, shuffle=True, seed=1, epoch=2, rank=r, world_size=w, pad=True) for r in range(w)]
        assert len({len(p) for p in padded}) == 1 and set(np.concatenate(padded).tolist()) == set(range(n))
    a = shard_indices(10, shuffle=True, seed=1, epoch=0, rank=0, world_size=1, pad=True)
    b = shard_indices(10, shuffle=True, seed=1, epoch=1, rank=0, world_size=1, pad=True)
    assert sorted(a.tolist()) == sorted(b.tolist()) and a.tolist() != b.tolist()


def test_in_memory_loader_contract_and_replay():
    ds = tiny_memory((6, 10, 4))
    train, _ = stratified_split(ds, 0.25)
    aug = BatchAugment([0.0] * 3, [1.0] * 3, size=8, train=True, pad=2)
    loader = build_loader(train, aug, batch_size=4, seed=5)
    assert loader.num_samples == len(train) == 15 and len(loader) == 3
    loader.set_epoch(3)
    x, y = _epoch(loader)
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = build_loader(train, aug, batch_size=4, seed=5)  # e.g. after a resume
    again.set_epoch(3)
    x2, y2 = _epoch(again)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    loader.set_epoch(4)
    assert not torch.equal(_epoch(loader)[0], x)
    ev = build_loader(
        train, BatchAugment([0.0] * 3, [1.0] * 3, size=8, train=False), batch_size=4, shuffle=False, drop_last=False
    )
    xe, ye = _epoch(ev)
    values = (xe[:, 0, 0, 0] * 255).round().long()
    assert values.tolist() == train.indices.tolist() and ye.tolist() == train.targets.tolist()


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_two_ranks_cover_everything_once(tmp_path, kind):
    if kind == "memory":
        ds = tiny_memory((4, 3))
        tf = BatchAugment([0.0] * 3, [1.0] * 3, size=8, train=False)
    else:
        write_folder(tmp_path, {"a": 4, "b": 3}, size=(6, 6))
        ds = ImageFolderDataset(tmp_path)
        tf = large_eval_transform([0.0] * 3, [1.0] * 3, crop=6, scale=6)
    seen, labels = [], []
    for rank in range(2):
        loader = build_loader(
            ds, tf, batch_size=2, shuffle=True, drop_last=False, seed=9, rank=rank, world_size=2, pad_shards=False
        )
        loader.set_epoch(1)
        assert loader.num_samples == (4 if rank == 0 else 3)
        x, y = _epoch(loader)
        seen.append(x)
        labels += y.tolist()
    assert sorted(labels) == sorted(ds.targets.tolist())
    allx = torch.cat(seen)
    if kind == "memory":  # image i holds value i: every index exactly once
        assert sorted((allx[:, 0, 0, 0] * 255).round().long().tolist()) == list(range(7))
    else:  # write_folder gives every image a distinct green value
        assert sorted((allx[:, 1, 0, 0] * 255).round().long().tolist()) == sorted([0, 20, 40, 60, 0, 20, 40])
    padded = [build_loader(ds, tf, batch_size=2, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert padded[0].num_samples == padded[1].num_samples == 4


def test_file_loader_replays_with_workers(tmp_path):
    write_folder(tmp_path, {"a": 5, "b": 5}, size=(20, 16))
    ds = ImageFolderDataset(tmp_path)
    tf = large_train_transform([0.5] * 3, [0.5] * 3, crop=8, scale=[10, 14])
    outs = []
    for workers in (0, 2):
        loader = build_loader(ds, tf, batch_size=4, seed=3, workers=workers)
        loader.set_epoch(2)
        outs.append(_epoch(loader))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    state = torch.random.get_rng_state()
    loader = build_loader(ds, tf, batch_size=4, seed=3)
    _epoch(loader)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone


class _DyingDataset(torch.utils.data.Dataset):
    classes: ClassVar[list[str]] = ["a"]
    targets = np.zeros(8, dtype=np.int64)
    source = "dying-dataset"

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(3)
        return torch.zeros(3, 2, 2), 0


def test_crashed_worker_gives_data_error():
    loader = build_loader(_DyingDataset(), lambda x: x, batch_size=2, workers=1, timeout=30)
    with pytest.raises(DataError, match=r"data loading worker failed while reading dying-dataset"):
        list(loader)


class _HangingDataset(_DyingDataset):
    source = "hanging-dataset"

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            time.sleep(30)
        return torch.zeros(3, 2, 2), 0


def test_hung_worker_times_out_with_data_error():
    loader = build_loader(_HangingDataset(), lambda x: x, batch_size=2, workers=1, timeout=2)
    with pytest.raises(DataError, match=r"worker failed while reading hanging-dataset \(DataLoader timed out"):
        next(iter(loader))


def test_worker_data_error_keeps_its_message(tmp_path):
    write_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "img_0.png").write_text("garbage")
    ds = ImageFolderDataset(tmp_path)
    tf = large_eval_transform([0.5] * 3, [0.5] * 3, crop=8, scale=8)
    with pytest.raises(DataError) as err:
        list(build_loader(ds, tf, batch_size=2, workers=1, shuffle=False))
    assert str(err.value).startswith(str(tmp_path / "a" / "img_0.png")) and "Traceback" not in str(err.value)


def test_loader_argument_errors():
    ds = tiny_memory()
    with pytest.raises(ConfigError, match=r"rank=2"):
        build_loader(ds, None, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ConfigError, match=r"batch_size=0"):
        build_loader(ds, None, batch_size=0)
    small = build_loader(ds, None, batch_size=16, world_size=2)  # drop_last would leave an empty epoch
    assert len(small) == 1 and [len(y) for _, y in small] == [10]
    assert len(build_loader(ds, None, batch_size=4, world_size=2)) == 2  # otherwise the remainder is dropped


class _Quiet(_DyingDataset):
    source = "quiet-dataset"

    def __getitem__(self, index):
        return torch.zeros(3, 2, 2), 0


def test_a_dropped_loader_shuts_its_workers_down():
    """The copy-on-write freeze of the heap is undone in the parent once the workers are forked: a loader
    that is dropped (it is in a reference cycle) is collected and its persistent workers stop."""
    import gc

    for _ in range(2):
        loader = build_loader(_Quiet(), lambda x: x, batch_size=2, workers=1, shuffle=False)
        assert len(list(loader)) == 4
        workers = list(loader._loader._iterator._workers)  # torch's persistent worker processes
        assert workers and all(w.is_alive() for w in workers)
        del loader
        gc.collect()
        deadline = time.monotonic() + 10
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(w.is_alive() for w in workers)
    assert gc.get_freeze_count() == 0

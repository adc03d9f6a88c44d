"""Device JPEG decoding (``data.decode_device``, ``coarse2fine.data.device_decode``) through its CPU path:
the same code that decodes on a GPU, run with ``device="cpu"``, against the Pillow path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coarse2fine.config import load_config
from coarse2fine.data import ImageFolderDataset, build_loader, large_eval_transform
from coarse2fine.data.device_decode import DeviceDecodeLoader, DeviceTransform, device_transforms
from coarse2fine.errors import DataError

MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]
# torchvision 0.29 marks its image decoders deprecated (superseded by TorchCodec); they work
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour fields with some texture: JPEG-friendly like a photograph."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float64)
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _tree(root: Path, sizes: list[tuple[int, int]], png_every: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img = _photo(rng, w, h)
        if png_every and i % png_every == 0:
            img.save(folder / f"{i:03d}.png")
        else:
            img.save(folder / f"{i:03d}.jpg", quality=92)
    return root


SIZES = [(80, 60), (50, 90), (64, 64), (120, 45), (45, 70), (96, 72)]


def _pil_batches(dataset: ImageFolderDataset, crop: int, q: int) -> torch.Tensor:
    tf = large_eval_transform(MEAN, STD, crop=crop, scale=q)
    return torch.stack([tf(dataset[i][0]) for i in range(len(dataset))])


def _device_batches(dataset: ImageFolderDataset, transform: DeviceTransform, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DeviceDecodeLoader(dataset, transform, device="cpu", batch_size=4, shuffle=False, drop_last=False, **kw)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("png_every", [0, 3])
def test_cpu_decode_matches_the_pillow_path(tmp_path: Path, png_every: int) -> None:
    """Evaluation pipeline (resize the shortest side to Q, centre crop, normalise): decode_jpeg on the CPU
    through the device code path gives Pillow's tensors within JPEG / resampling tolerance."""
    ds = ImageFolderDataset(_tree(tmp_path, SIZES, png_every))
    pil = _pil_batches(ds, crop=32, q=40)
    dev, labels = _device_batches(ds, DeviceTransform(MEAN, STD, crop=32, scale=[40], train=False))
    assert dev.shape == pil.shape == (len(SIZES), 3, 32, 32) and dev.dtype == torch.float32
    assert labels.tolist() == ds.targets.tolist()
    diff = (dev - pil).abs() * 0.25 * 255  # back to 8-bit grey levels
    # both decode with libjpeg-turbo and resize with the same tensor kernel: 0.00 here; a tolerance for other builds
    assert float(diff.mean()) < 1.0, float(diff.mean())
    assert float(diff.max()) < 16, float(diff.max())


def test_training_transform_shapes_seeds_and_flips(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_tree(tmp_path, SIZES * 2))
    train, _ = device_transforms({"mean": MEAN, "std": STD}, image_size=32, train_scale=[36, 48])
    loader = DeviceDecodeLoader(ds, train, device="cpu", batch_size=4, shuffle=True, drop_last=True, seed=3)
    loader.set_epoch(1)
    a = [x.clone() for x, _ in loader]
    loader.set_epoch(1)
    b = [x for x, _ in loader]
    loader.set_epoch(2)
    c = [x for x, _ in loader]
    assert len(a) == len(loader) == 3 and all(x.shape == (4, 3, 32, 32) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # an epoch replays identically
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(torch.isfinite(x).all() for x in a)


def test_flip_and_colour_shift_are_per_image() -> None:
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8).remainder(256).to(torch.uint8)
    tf = DeviceTransform([0, 0, 0], [1, 1, 1], crop=8, scale=[8], train=True, flip=True)
    out = tf([img] * 64, torch.Generator().manual_seed(0))
    ref = img.float() / 255
    flipped = torch.tensor([torch.allclose(o, ref.flip(-1)) for o in out])
    assert all(torch.allclose(o, ref) or f for o, f in zip(out, flipped))
    assert 10 < int(flipped.sum()) < 54
    shift = DeviceTransform([0, 0, 0], [1, 1, 1], crop=8, scale=[8], train=True, flip=False, color_shift=0.1)
    out = shift([img] * 4, torch.Generator().manual_seed(0))
    offsets = (out - ref).mean(dim=(2, 3))  # one RGB offset per image
    assert torch.allclose(out - ref, offsets[:, :, None, None].expand_as(out), atol=1e-5)
    assert len({tuple(o.tolist()) for o in offsets.round(decimals=5)}) == 4


def test_bad_files_follow_the_policy(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", SIZES)
    bad = root / "c0" / "zzz.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)  # a JPEG header, then garbage
    tf = DeviceTransform(MEAN, STD, crop=32, scale=[40], train=False)
    with pytest.raises(DataError, match=r"zzz\.jpg"):
        _device_batches(ImageFolderDataset(root), tf)
    text = root / "c1" / "notes.jpg"
    text.write_bytes(b"not an image at all")
    skipping = ImageFolderDataset(root, bad_images="skip")
    x, y = _device_batches(skipping, tf)
    assert x.shape[0] == y.shape[0] == len(SIZES)
    assert set(skipping.skipped) == {str(bad), str(text)}
    bad.unlink()
    with pytest.raises(DataError, match=r"notes\.jpg"):
        _device_batches(ImageFolderDataset(root), tf)


def test_workers_read_bytes_and_the_main_process_decodes(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_tree(tmp_path, SIZES))
    tf = DeviceTransform(MEAN, STD, crop=32, scale=[40], train=False)
    in_process, _ = _device_batches(ds, tf)
    with_worker, _ = _device_batches(ds, tf, workers=1)
    torch.testing.assert_close(in_process, with_worker)
    plain = build_loader(ds, large_eval_transform(MEAN, STD, crop=32, scale=40), batch_size=4, shuffle=False,
                         drop_last=False)
    assert len(plain) == len(DeviceDecodeLoader(ds, tf, device="cpu", batch_size=4, shuffle=False, drop_last=False))


def test_config_key() -> None:
    assert load_config(None).data.decode_device == "cpu"
    assert load_config(None, ["data.decode_device=cuda"]).data.decode_device == "cuda"
    with pytest.raises(Exception, match="decode_device"):
        load_config(None, ["data.decode_device=gpu"])


def test_recipe_builds_device_loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data.decode_device: cuda`` gives a run's loaders the device path (run here on the CPU: the device
    is patched); its evaluation batches match the Pillow loader's of the same recipe, image for image."""
    import coarse2fine.recipes.data as recipe_data
    from coarse2fine.recipes import build_datasets, build_loaders

    root = _tree(tmp_path / "tree", SIZES * 2)
    sets = [f"data.root={root}", "data.name=folder", "data.test_fraction=0.25", "data.val_fraction=0.2",
            "data.workers=0", "data.image_size=32", "data.train_scale=[36]", "data.batch_size=4", "data.cache=off"]
    monkeypatch.setattr(recipe_data, "resolve_device", lambda device: torch.device("cpu"))
    loaders = {}
    for where in ("cpu", "cuda"):
        cfg = load_config(None, [*sets, f"data.decode_device={where}", f"train.device={where}"])
        bundle = build_datasets(cfg)
        loaders[where] = build_loaders(cfg, bundle)
    device, pillow = loaders["cuda"], loaders["cpu"]
    assert all(isinstance(ld, DeviceDecodeLoader) for ld in (device.train, device.val, device.test))
    assert not isinstance(pillow.test, DeviceDecodeLoader)
    x, y = next(iter(device.train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    (xd, yd), (xp, yp) = (tuple(torch.cat(t) for t in zip(*ld.test)) for ld in (device, pillow))
    assert torch.equal(yd, yp)
    grey = (xd - xp).abs() * torch.tensor(bundle.stats["std"]).view(1, 3, 1, 1) * 255
    assert grey.mean() < 2 and grey.max() < 40


def test_device_decoding_needs_a_gpu_run() -> None:
    from coarse2fine.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.decode_device.*train\.device is cpu"):
        load_config(None, ["data.decode_device=cuda", "train.device=cpu"])
    with pytest.raises(ConfigError, match=r"data\.decode_device.*auto_augment"):
        load_config(None, ["data.decode_device=cuda", "data.auto_augment=rand"])

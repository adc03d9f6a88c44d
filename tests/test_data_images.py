"""Class-per-folder trees, bad images (error / skip), decompression bombs and Pillow mode conversions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from coarse2fine.data import ImageFolderDataset, build_loader, convert_mode, load_dataset, load_image
from coarse2fine.data.transforms import large_eval_transform
from coarse2fine.errors import ConfigError, DataError
from helpers.data import write_folder, write_png


def test_folder_flat_tree(tmp_path):
    write_folder(tmp_path, {"cat": 3, "dog": 2})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"")
    write_png(tmp_path / "dog" / "nested" / "deep.PNG")
    ds = load_dataset("folder", tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.paths[-1].endswith("img_1.png") or any(p.endswith("deep.PNG") for p in ds.paths)
    assert not ds.in_memory and ds.num_channels == 3 and ds.default_image_size == 224
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (12, 10) and label == 0
    with pytest.raises(DataError, match=r"flat class-per-folder tree holds only the training split"):
        ImageFolderDataset(tmp_path, "test")


def test_folder_split_tree(tmp_path):
    write_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 1})
    write_folder(tmp_path / "val", {"a": 1, "c": 2})  # b absent from val: allowed
    val = ImageFolderDataset(tmp_path, "val")
    assert val.classes == ["a", "b", "c"] and val.targets.tolist() == [0, 2, 2]
    with pytest.raises(DataError, match=r"has split folders train, val/ but no test/"):
        ImageFolderDataset(tmp_path, "test")
    write_folder(tmp_path / "val", {"zebra": 1})
    with pytest.raises(DataError, match=r"val: class folder\(s\) zebra are not in .*train"):
        ImageFolderDataset(tmp_path, "val")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "no class folders"),
        ({"a": 2, "b": 0}, "b: class folder has no images"),
        ({"Cat": 1, "cat": 1}, "class folders 'Cat' and 'cat' differ only in Unicode normalisation, case"),
        ({"caf\u00e9": 1, "cafe\u0301": 1}, "class folders 'caf.+' and 'caf.+' differ only in Unicode normalisation"),
    ],
)
def test_folder_structure_errors(tmp_path, layout, message):
    tmp_path.joinpath("root").mkdir()
    write_folder(tmp_path / "root", layout)
    for name, count in layout.items():
        if count == 0:
            (tmp_path / "root" / name).mkdir()
            (tmp_path / "root" / name / "readme.md").write_text("x")
    with pytest.raises(DataError, match=message):
        ImageFolderDataset(tmp_path / "root")


def test_folder_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"nope: image folder does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"split='dev'"):
        ImageFolderDataset(tmp_path, "dev")


def _bad_files(folder):
    """One of each kind of bad image file, in class 'bad'; returns {path: expected message part}."""
    write_png(folder / "bad" / "good.png")
    buf = folder / "bad" / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    buf.write_bytes(buf.read_bytes()[:300])
    (folder / "bad" / "zero.jpg").write_bytes(b"")
    (folder / "bad" / "text.png").write_text("this is not a PNG")
    corrupt = folder / "bad" / "corrupt.jpg"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(corrupt, format="JPEG")
    data = bytearray(corrupt.read_bytes())
    data[20:200] = b"\xff" * 180
    corrupt.write_bytes(bytes(data))
    return {
        str(buf): "corrupt or truncated",
        str(folder / "bad" / "zero.jpg"): "zero-byte",
        str(folder / "bad" / "text.png"): "not an image",
        str(corrupt): "corrupt|not an image",
    }


def test_bad_images_error_policy_names_each_file(tmp_path):
    bad = _bad_files(tmp_path)
    with pytest.raises(DataError, match=r"zero.jpg: empty \(zero-byte\) file"):
        ImageFolderDataset(tmp_path)  # zero-byte files are found while listing
    (tmp_path / "bad" / "zero.jpg").unlink()
    del bad[str(tmp_path / "bad" / "zero.jpg")]
    for path, part in bad.items():
        with pytest.raises(DataError, match=part) as err:
            load_image(path)
        assert path in str(err.value)
    ds = ImageFolderDataset(tmp_path)
    failures = 0
    for i in range(len(ds)):
        try:
            ds[i]
        except DataError as exc:
            assert ds.paths[i] in str(exc) and "bad_images=skip" in str(exc)
            failures += 1
    assert failures == 3


def test_bad_images_skip_policy_records_them(tmp_path):
    bad = _bad_files(tmp_path)
    write_png(tmp_path / "good" / "ok.png")
    ds = ImageFolderDataset(tmp_path, bad_images="skip")
    assert list(ds.skipped) == [str(tmp_path / "bad" / "zero.jpg")]  # dropped while listing
    tf = large_eval_transform([0.5] * 3, [0.25] * 3, crop=8, scale=8)
    seen = 0
    for _epoch in range(2):
        for x, y in build_loader(ds, tf, batch_size=4, shuffle=False, drop_last=False):
            assert x.shape[1:] == (3, 8, 8) and x.shape[0] == y.shape[0]
            seen += len(y)
    assert seen == 2 * 2  # good.png and ok.png, twice
    assert set(ds.skipped) == set(bad)  # each recorded once, with its reason
    assert "zero-byte" in ds.skipped[str(tmp_path / "bad" / "zero.jpg")]


def test_decompression_bomb_refused_without_decoding(tmp_path, monkeypatch):
    path = write_png(tmp_path / "c" / "bomb.png", size=(64, 64))
    write_png(tmp_path / "c" / "fine.png", size=(8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64 * 64 = 4096 > 3000: Pillow only warns
    decoded, original_load = [], Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(DataError, match=r"bomb.png: 64x64 = 4096 pixels exceeds Pillow's decompression-bomb limit"):
        load_image(path)
    assert decoded == []  # never decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over 2x the limit Pillow itself refuses at open
    with pytest.raises(DataError, match=r"bomb.png"):
        load_image(path)
    assert decoded == []
    monkeypatch.setattr(Image.Image, "load", original_load)
    ds = ImageFolderDataset(tmp_path, bad_images="skip")
    assert type(ds[0]).__name__ == "Skipped" and "decompression bomb" in ds[0].reason
    assert ds[1][0].size == (8, 8)
    with pytest.raises(DataError, match=r"bomb.png"):
        ImageFolderDataset(tmp_path)[0]


# ---- mode conversions --------------------------------------------------------------------------


def _save_open(img: Image.Image, path):
    img.save(path)
    with Image.open(path) as reopened:
        reopened.load()
        return reopened.copy()


def test_mode_conversions(tmp_path):
    gray = Image.new("L", (4, 3), 77)
    assert convert_mode(gray).mode == "RGB" and convert_mode(gray).getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (4, 3), (200, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 1), (200, 0, 0, 255))
    white = convert_mode(rgba, alpha="white")
    assert white.getpixel((0, 0)) == (255, 255, 255) and white.getpixel((1, 1)) == (200, 0, 0)
    assert convert_mode(rgba, alpha="drop").getpixel((0, 0)) == (200, 0, 0)
    half = convert_mode(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert half.getpixel((0, 0)) == (127, 127, 127)
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert convert_mode(pal).getpixel((0, 0)) == (10, 20, 30)
    pal.info["transparency"] = 1
    assert convert_mode(pal).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert convert_mode(cmyk).getpixel((0, 0)) == (255, 0, 0)
    assert convert_mode(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert convert_mode(Image.new("RGB", (2, 2), (10, 20, 30)), "L").mode == "L"
    la = Image.new("LA", (2, 2), (50, 0))
    assert convert_mode(la, "L").getpixel((0, 0)) == 255


def test_sixteen_bit_and_files_on_disk(tmp_path):
    arr = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    sixteen = _save_open(Image.fromarray(arr), tmp_path / "g16.png")
    assert sixteen.mode.startswith("I")
    out = convert_mode(sixteen, "L")
    assert np.asarray(out).tolist() == [[0, 255], [128, 1]]
    assert convert_mode(sixteen).getpixel((1, 0)) == (255, 255, 255)
    rgba_file = tmp_path / "a.png"
    Image.new("RGBA", (3, 3), (0, 0, 255, 0)).save(rgba_file)
    assert load_image(rgba_file).getpixel((0, 0)) == (255, 255, 255)
    cmyk_file = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(cmyk_file)
    assert load_image(cmyk_file).mode == "RGB"
    pal_file = tmp_path / "p.gif"
    Image.new("P", (3, 3), 0).save(pal_file)
    assert load_image(pal_file, mode="L").mode == "L"


def test_grayscale_folder_dataset(tmp_path):
    write_folder(tmp_path, {"x": 2, "y": 2})
    ds = ImageFolderDataset(tmp_path, mode="L")
    img, _ = ds[0]
    assert ds.num_channels == 1 and img.mode == "L"
    tf = large_eval_transform([0.5], [0.5], crop=8, scale=10)
    x, _ = next(iter(build_loader(ds, tf, batch_size=4, shuffle=False)))
    assert x.shape == (4, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"mode='CMYK'"):
        ImageFolderDataset(tmp_path, mode="CMYK")


def test_path_table_round_trips_any_name(tmp_path):
    from coarse2fine.data.base import PathTable

    names = [str(tmp_path / "a.png"), "/x/ünïcödé/猫.jpg", "rel/b.png", ""]
    table = PathTable(names)
    assert len(table) == 4 and list(table) == names and table[-3] == names[1]
    with pytest.raises(IndexError):
        table[4]


def test_folder_symlink_cycle_listed_once(tmp_path):
    write_folder(tmp_path, {"a": 2, "b": 1})
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "b" / "same").symlink_to(tmp_path / "b", target_is_directory=True)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.targets.tolist() == [0, 0, 1]


def test_class_names_are_nfc_and_split_folders_match_across_normalisations(tmp_path):
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    write_folder(tmp_path / "train", {decomposed: 2, "tea": 2})
    write_folder(tmp_path / "test", {composed: 1, "tea": 1})
    train = ImageFolderDataset(tmp_path, "train")
    test = ImageFolderDataset(tmp_path, "test")
    assert train.classes == test.classes == [composed, "tea"]
    assert list(test.targets) == [0, 1] and len(train) == 4

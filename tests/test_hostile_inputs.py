"""Hostile recipes, --set values and image files (issue #17): YAML bombs and oversized documents refused
before they cost time or memory, error messages that never quote more than a few hundred characters,
one image opener (with the decompression-bomb policy) for every command that reads an image."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coarse2fine.cli import main
from coarse2fine.config import MAX_YAML_ALIASES, MAX_YAML_BYTES, load_config, quote, to_dict
from coarse2fine.data import ImageFileDataset, build_loader, build_transforms, load_dataset
from coarse2fine.data import load_image as shared_load_image
from coarse2fine.engine import distributed
from coarse2fine.engine.checkpoint import save_checkpoint
from coarse2fine.engine.evaluate import resolve_device
from coarse2fine.errors import ConfigError, DataError, ModelError
from coarse2fine.facts import RunFacts
from coarse2fine.herbs.explain import load_image as explain_load_image
from coarse2fine.models import create_model
from coarse2fine.recipes.explain import picture_names
from coarse2fine.recipes.models import build_model_and_objective

BILLION_LAUGHS = """\
name: laughs
model:
  name: vgg_small_bn
  kwargs:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---- recipes and --set values ----------------------------------------------------------------------


def test_billion_laughs_recipe_is_refused_in_milliseconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(BILLION_LAUGHS)
    assert recipe.stat().st_size < 1024  # 1 KB that expands to 9**9 strings
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand it to over 10,000 values") as err:
        load_config(recipe)
    assert time.perf_counter() - start < 0.5
    assert len(str(err.value)) < 200
    start = time.perf_counter()
    assert main(["train", "--config", str(recipe), "--set", f"out_dir={tmp_path / 'runs'}"]) == 2
    assert time.perf_counter() - start < 1.0
    assert "laughs.yaml" in _error_line(capsys) and not (tmp_path / "runs").exists()


def test_the_same_bomb_in_a_set_value_is_refused() -> None:
    value = BILLION_LAUGHS.split("kwargs:\n", 1)[1]
    inline = "{" + ", ".join(line.strip() for line in value.splitlines()) + "}"
    with pytest.raises(ConfigError, match=r"^--set 'model\.kwargs=.*aliases expand it"):
        load_config(None, [f"model.kwargs={inline}"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("&a [1, *a]", "an alias refers to the value that contains it"),  # a recursive structure
        ("[" * 40 + "]" * 40, "nested deeper than 32 levels"),
        ("{x: &x 1, y: [" + ", ".join(["*x"] * (MAX_YAML_ALIASES + 1)) + "]}", "more than 100 aliases"),
        ("!!binary aGVsbG8=", "the tag 'binary' is not a plain value"),
        ("!!set {a, b}", "the tag 'set' is not a plain value"),
        ("!!python/object/apply:os.system [echo hacked]", "could not determine a constructor"),
        ("9" * 5000, "Exceeds the limit (4300 digits)"),
        ("[1, 2", "not valid YAML: while parsing a flow sequence"),
    ],
)
def test_hostile_yaml_values_are_refused_with_one_line(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.kwargs={value}"])
    assert message in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 500


def test_oversized_recipes_and_set_values_are_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:  # sparse: 2 GiB on paper, nothing on disk; never read
        f.truncate(2 << 30)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"holds 2,147,483,648 bytes; a recipe may hold 1,048,576"):
        load_config(big)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ConfigError, match=r"^--set 'name=xxx.*is 1,048,577 characters long"):
        load_config(None, ["name=" + "x" * (MAX_YAML_BYTES + 1)])


def test_recipe_files_that_are_not_text_or_not_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a recipe"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 9\)"):
        load_config(latin)


def test_a_date_stays_the_text_written(tmp_path: Path) -> None:
    recipe = tmp_path / "dated.yaml"
    recipe.write_text("name: 2024-01-31\n")
    assert load_config(recipe).name == "2024-01-31"  # YAML 1.1 would make it a datetime.date


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=" + "x" * 10_000, "train.epochs: expected an integer, got 'xxxxx"),
        ("eval.scales=[" + ", ".join(["1"] * 5000) + ", a]", "eval.scales[5000]: expected an integer, got 'a'"),
        ("data.root=" + "r" * 5000, "data.root: 'rrrr"),
        ('out_dir="a\\x00b"', "out_dir: 'a\\x00b' holds a NUL character"),
        ("optim.lr=" + str(10**30), "is too large (at most 9223372036854775807)"),
        ("train.epochs=1e30", "is too large (at most 9223372036854775807)"),
        ("optim.lr=.inf", "optim.lr: must be >= 0 and finite, got inf"),
        ("name=a/../../etc", "name: unknown value 'a/../../etc'; use one folder name"),
        ("name=..", "name: unknown value '..'"),
        ("train={1: 2, epochs: 3}", "train: unknown key(s) 1; valid keys:"),
        ("model.kwargs={1: 2}", "model.kwargs: keys must be names (keyword arguments), got 1"),
        ("seed=" + str(2**64), "seed: 18446744073709551616 is too large"),
    ],
)
def test_messages_quote_at_most_a_few_hundred_characters(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    text = str(err.value)
    assert message in text, text
    assert len(text) < 700 and "\n" not in text


def test_quote_never_builds_a_huge_repr() -> None:
    assert quote(10**5000) == "<an integer of about 5001 digits>"  # repr() would raise (over 4300 digits)
    assert len(quote("x" * 10**6)) < 200
    assert len(quote([list(range(1000))] * 1000)) <= 200
    assert quote({"a": [1, 2]}) == "{'a': [1, 2]}"


# ---- images: one opener --------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A 65-byte PNG whose header claims ``width`` x ``height`` pixels (no pixel data worth decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def herbs_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained HERBS checkpoint (small VGG, 28 x 28 grayscale) as ``c2f train`` writes one."""
    cfg = load_config("configs/herbs_fashion_mnist.yaml", ["train.device=cpu"])
    classes = [f"class{i}" for i in range(10)]
    facts = RunFacts(1, 28, {"mean": [0.3], "std": [0.3]}, in_memory=True, classes=classes)
    model, _ = build_model_and_objective(cfg, facts)
    path = tmp_path_factory.mktemp("herbs") / "herbs.pt"
    save_checkpoint(
        {"model": model.state_dict(), "config": to_dict(cfg), "classes": classes, "metadata": facts.to_dict()}, path
    )
    return path


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, size=(40, 36), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_explain_refuses_a_decompression_bomb_from_its_header(
    herbs_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60_000, 60_000))  # 3.6 gigapixels claimed in 65 bytes
    out = tmp_path / "pictures"
    start = time.perf_counter()
    assert main(["explain", str(bomb), "--checkpoint", str(herbs_checkpoint), "--out", str(out)]) == 2
    assert time.perf_counter() - start < 30
    line = _error_line(capsys)
    assert "bomb.png: refused without decoding" in line and "3600000000 pixels" in line
    assert not out.exists() or not list(out.iterdir())


def test_explain_pictures_of_images_sharing_a_name_never_overwrite_each_other(
    herbs_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [_image(tmp_path / "a" / "cat.png", 0), _image(tmp_path / "b" / "cat.png", 1)]
    images.append(_image(tmp_path / "a" / "cat.bmp", 2))  # the same stem in the same folder
    images.append(_image(tmp_path / "a" / "dog.png", 3))
    out = tmp_path / "pictures"
    args = ["explain", *map(str, images), "--checkpoint", str(herbs_checkpoint), "--out", str(out)]
    assert main(args) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and "dog.png" in written
    assert all(n.startswith("cat_") and len(n) == len("cat_12345678.png") for n in written if n != "dog.png")
    stdout = capsys.readouterr().out
    assert all(str(out / n) in stdout for n in written)  # each picture is named next to its image


def test_picture_names_are_stable_and_unique() -> None:
    names = picture_names(["x/a.png", "y/a.png", "b.jpg", "x/a.png"])
    assert names[2] == "b.png" and names[0] == names[3] and names[0] != names[1]
    assert picture_names(["x/a.png", "y/a.png"]) == names[:2]


@pytest.mark.parametrize(
    "opener",
    [
        lambda p: explain_load_image(p, in_chans=3, size=32, scale=None, mean=[0.5] * 3, std=[0.5] * 3),
        lambda p: shared_load_image(p),
    ],
    ids=["explain", "predict and datasets"],
)
def test_a_directory_given_as_an_image_is_named_a_directory(tmp_path: Path, opener) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="is a directory, not an image file"):
        opener(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        opener(tmp_path / "missing.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60_000, 60_000))
    with pytest.raises(DataError, match="refused without decoding"):
        opener(bomb)


def test_explain_of_a_directory_exits_2(
    herbs_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(tmp_path), "--checkpoint", str(herbs_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "is a directory, not an image file" in _error_line(capsys)


def test_other_modules_cap_the_values_they_quote(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'xxx") as err:
        load_dataset("x" * 100_000, None, "train")
    assert len(str(err.value)) < 400
    monkeypatch.setenv("WORLD_SIZE", "9" * 5000 + "x")
    with pytest.raises(ConfigError, match="environment variable WORLD_SIZE='999") as err:
        distributed.init_distributed()
    assert len(str(err.value)) < 400


# ---- what the property test found (tests/test_config_fuzz.py) -----------------------------------------


def test_a_model_build_that_cannot_work_is_a_model_error() -> None:
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"fc1 would hold 32,768,000,000 weights \(over 1,073,741,824"):
        create_model("vgg16", num_classes=10, input_size=4000)  # never allocated
    with pytest.raises(ModelError, match=r"model 'vgg_small_bn' cannot be built with dropout=5: dropout probability"):
        create_model("vgg_small_bn", num_classes=10, in_chans=1, dropout=5)
    assert time.perf_counter() - start < 2.0


def test_devices_workers_and_sizes_out_of_reach_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.device=cuda:99: this machine has .*--set train\.device=cpu"):
        resolve_device("cuda:99")
    images = [_image(tmp_path / f"{i}.png", i) for i in range(2)]
    dataset = ImageFileDataset([str(p) for p in images], [0, 1], ["a", "b"], source="two images")
    with pytest.raises(ConfigError, match=r"data\.workers=1000000 must be in \[0, 256\]"):
        build_loader(dataset, None, batch_size=1, workers=1_000_000)
    with pytest.raises(ConfigError, match=r"data\.train_scale=100000 is over 8192 pixels"):
        build_transforms({"mean": [0.5] * 3, "std": [0.5] * 3}, in_memory=False, image_size=224, train_scale=[100_000])


def test_a_file_system_refusal_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_dir = "d" * 300  # one path component over NAME_MAX (255)
    args = ["train", "--config", "configs/fashion_mnist_vgg.yaml", "--check"]
    assert main([*args, "--set", f"data.root={tmp_path}/{long_dir}"]) == 2
    assert "File name too long" in _error_line(capsys)

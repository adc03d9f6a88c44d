"""Dataset readers on tiny files in the real formats: IDX, Fashion-MNIST, CIFAR pickles, CUB, NABirds."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from coarse2fine.data import CIFAR10, CIFAR100, CUB200, DATASETS, FashionMNIST, NABirds, load_dataset, read_idx
from coarse2fine.data import fashion_mnist as fm
from coarse2fine.data.idx import write_idx
from coarse2fine.errors import ConfigError, DataError
from helpers.data import COARSE, FINE, write_cifar100, write_cub, write_fashion_mnist, write_nabirds

# ---- IDX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip(tmp_path, name, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    write_idx(tmp_path / name, arr)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype).newbyteorder("=") and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, arr)


def test_idx_header_is_big_endian(tmp_path):
    write_idx(tmp_path / "x", np.array([1, 258], dtype=np.int16))
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0B, 1]) and raw[4:8] == (2).to_bytes(4, "big")
    assert raw[8:] == (1).to_bytes(2, "big") + (258).to_bytes(2, "big")


def test_idx_truncated_plain_names_sizes(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 5), np.uint8))
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(raw[:-3])
    with pytest.raises(DataError, match=r"x: truncated IDX file.*4x5.*need 32 bytes.*found 29"):
        read_idx(tmp_path / "x")
    (tmp_path / "x").write_bytes(raw + b"\0")
    with pytest.raises(DataError, match=r"wrongly sized.*need 32 bytes.*found 33"):
        read_idx(tmp_path / "x")


def test_idx_truncated_gzip_stream(tmp_path):
    write_idx(tmp_path / "x.gz", np.arange(5000, dtype=np.int32))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"x.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "x.gz")


def test_idx_bad_magic_and_type(tmp_path):
    (tmp_path / "m").write_bytes(b"\x01\x00\x08\x01" + b"\0" * 8)
    with pytest.raises(DataError, match=r"m: not an IDX file"):
        read_idx(tmp_path / "m")
    (tmp_path / "t").write_bytes(b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\0")
    with pytest.raises(DataError, match=r"unknown IDX type code 0x07"):
        read_idx(tmp_path / "t")
    (tmp_path / "h").write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(DataError, match=r"truncated IDX header: expected 16 bytes"):
        read_idx(tmp_path / "h")
    with gzip.open(tmp_path / "s.gz", "wb") as gz:
        gz.write(b"\0\0")
    with pytest.raises(DataError, match=r"too short"):
        read_idx(tmp_path / "s.gz")


# ---- Fashion-MNIST -----------------------------------------------------------------------------


@pytest.fixture
def no_default_roots(monkeypatch, tmp_path):
    """Hide the system copy and ./data so only the roots a test gives are searched."""
    monkeypatch.setattr(fm, "DEFAULT_ROOTS", (tmp_path / "nowhere",))
    monkeypatch.setattr(fm, "DOWNLOAD_ROOT", tmp_path / "dl")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_both_splits(tmp_path, gz, no_default_roots):
    written = write_fashion_mnist(tmp_path / "fm", gz=gz)
    train = load_dataset("fashion_mnist", tmp_path / "fm", "train")
    test = FashionMNIST(tmp_path / "fm", "test")
    assert isinstance(train, FashionMNIST) and train.in_memory and train.num_channels == 1
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.default_image_size == 28 and len(test) == 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(train.targets, written["train"][1])
    assert train.targets.dtype == np.int64
    img, label = train[7]
    assert int(img[0, 5, 5]) == 7 and label == 7
    assert getattr(train, "reference_hierarchy", None) is None


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "second", n_train=20)
    monkeypatch.setattr(fm, "DEFAULT_ROOTS", (tmp_path / "first", tmp_path / "second"))
    assert len(FashionMNIST(tmp_path / "given_but_empty")) == 20  # falls back along the search order
    write_fashion_mnist(tmp_path / "given", n_train=12)
    assert len(FashionMNIST(tmp_path / "given")) == 12  # the given root wins


def test_fashion_mnist_label_out_of_range(tmp_path, no_default_roots):
    write_fashion_mnist(tmp_path / "fm")
    labels = np.zeros(30, np.uint8)
    labels[3] = 12
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 12 at index 3 is out of range \[0, 10\)"):
        FashionMNIST(tmp_path / "fm")


def test_fashion_mnist_count_mismatch(tmp_path, no_default_roots):
    write_fashion_mnist(tmp_path / "fm")
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match=r"29 labels for 30 images"):
        FashionMNIST(tmp_path / "fm")


def test_fashion_mnist_missing_without_download(tmp_path, no_default_roots):
    with pytest.raises(DataError) as err:
        FashionMNIST(tmp_path / "empty")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path / "empty") in msg


def test_fashion_mnist_download_failure_says_where(tmp_path, monkeypatch, no_default_roots):
    monkeypatch.setattr(fm, "MIRRORS", ["http://127.0.0.1:9/"])  # nothing listens there: fails at once
    with pytest.raises(DataError) as err:
        FashionMNIST(None, download=True)
    msg = str(err.value)
    assert "Download failed" in msg and "127.0.0.1:9" in msg
    assert str(tmp_path / "dl") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert not list((tmp_path / "dl").glob("*.gz"))  # no partial file left behind


# ---- CIFAR -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar100_fine_and_coarse(tmp_path, protocol):
    write_cifar100(tmp_path, protocol=protocol)
    ds = load_dataset("cifar100", tmp_path, "train")
    assert ds.images.shape == (24, 3, 32, 32) and ds.num_channels == 3 and ds.default_image_size == 32
    assert ds.classes == FINE and ds.targets.tolist() == [i % 6 for i in range(24)]
    assert ds.reference_hierarchy == {
        "animals": ["fine0", "fine1"],
        "plants": ["fine2", "fine3"],
        "things": ["fine4", "fine5"],
    }
    with open(tmp_path / "cifar-100-python" / "train", "rb") as fh:
        raw = pickle.load(fh)
    first = raw[b"data"][0]
    assert torch.equal(ds.images[0, 0].flatten(), torch.from_numpy(first[:1024]))  # R plane first
    assert torch.equal(ds.images[0, 2].flatten(), torch.from_numpy(first[2048:]))
    coarse = CIFAR100(tmp_path / "cifar-100-python", "test", label="coarse")
    assert coarse.classes == COARSE and coarse.targets.max() == 2 and coarse.reference_hierarchy is None


def test_cifar100_bytes_meta(tmp_path):
    write_cifar100(tmp_path, str_meta=False)
    assert CIFAR100(tmp_path).classes == FINE


def test_cifar100_inconsistent_hierarchy(tmp_path):
    folder = write_cifar100(tmp_path)
    with open(folder / "train", "rb") as fh:
        batch = pickle.load(fh)
    batch[b"coarse_labels"][6] = 2  # fine0 now also under 'things'
    with open(folder / "train", "wb") as fh:
        pickle.dump(batch, fh)
    with pytest.raises(DataError, match=r"fine class 'fine0' appears under two coarse classes"):
        CIFAR100(tmp_path)


def test_cifar100_bad_contents(tmp_path):
    folder = write_cifar100(tmp_path)
    with open(folder / "train", "rb") as fh:
        batch = pickle.load(fh)
    batch[b"fine_labels"][3] = 100
    with open(folder / "train", "wb") as fh:
        pickle.dump(batch, fh)
    with pytest.raises(DataError, match=r"train \(fine_labels\): label 100 at index 3 is out of range"):
        CIFAR100(tmp_path)
    del batch[b"coarse_labels"]
    with open(folder / "train", "wb") as fh:
        pickle.dump(batch, fh)
    with pytest.raises(DataError, match=r"train: missing key.*coarse_labels"):
        CIFAR100(tmp_path)
    (folder / "test").write_bytes((folder / "test").read_bytes()[:500])
    with pytest.raises(DataError, match=r"test: .*(corrupt|truncated)"):
        CIFAR100(tmp_path, "test")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["train", "meta"])
def test_malicious_cifar_pickle_never_runs(tmp_path, where):
    folder = write_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker)} if where == "train" else {"fine_label_names": [_Evil(marker)]}
    with open(folder / where, "wb") as fh:
        pickle.dump(payload, fh)
    with pytest.raises(DataError, match=rf"{where}: refused or corrupt pickle: global '(posix|os)\.system'"):
        CIFAR100(tmp_path)
    assert not marker.exists()
    with open(folder / where, "rb") as fh:  # the control: plain pickle.load does run the command
        pickle.load(fh)
    assert marker.exists()


def test_restricted_unpickler_refuses_builtins(tmp_path):
    from coarse2fine.data import safe_load_pickle

    (tmp_path / "p").write_bytes(pickle.dumps({"x": eval}))  # a reference to builtins.eval
    with pytest.raises(DataError, match=r"builtins.eval"):
        safe_load_pickle(tmp_path / "p")
    (tmp_path / "q").write_bytes(pickle.dumps({"a": np.arange(3), "b": np.int64(4), "c": [1.5, b"x"]}, protocol=2))
    back = safe_load_pickle(tmp_path / "q")
    assert back["a"].tolist() == [0, 1, 2] and back["b"] == 4 and back["c"] == [1.5, b"x"]


def test_cifar100_missing_says_where(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-100 files train, meta not found .*cifar-100-python"):
        CIFAR100(tmp_path / "none")


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {b"data": np.full((3, 3072), i, np.uint8), b"labels": [i % 3, 1, 2], b"batch_label": b"x"}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": ["a", "b", "c"], "num_vis": 3072}, fh, protocol=2)
    ds = CIFAR10(tmp_path)
    assert len(ds) == 15 and ds.classes == ["a", "b", "c"] and int(ds.images[14, 0, 0, 0]) == 4
    assert len(load_dataset("cifar10", tmp_path, "test")) == 3


# ---- CUB and NABirds ---------------------------------------------------------------------------


def test_cub_official_split_and_names(tmp_path):
    write_cub(tmp_path)
    train = load_dataset("cub", tmp_path, "train")
    test = CUB200(tmp_path / "CUB_200_2011", "test")
    assert len(train) == 6 and len(test) == 6 and not train.in_memory and train.num_channels == 3
    assert train.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert train.raw_classes[0] == "001.Black_footed_Albatross"
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    img, label = train[2]
    assert img.mode == "RGB" and img.size == (16, 12) and label == 1


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("image_class_labels.txt", "1 1\n", "image_class_labels.txt: no entry for image id"),
        ("train_test_split.txt", "1 2\n", "is_training_image of image 1 must be 0 or 1"),
        ("images.txt", "1 a.jpg\n1 b.jpg\n", r"images.txt:2: duplicate id '1'"),
        ("classes.txt", "1 001.A\n", "class id 2 not listed"),
        ("images.txt", "", "images.txt: file is empty"),
        ("classes.txt", "x Foo\n", "class id 'x' is not an integer"),
    ],
)
def test_cub_bad_lists(tmp_path, file, content, message):
    folder = write_cub(tmp_path)
    if file == "train_test_split.txt":
        content = (folder / file).read_text().replace("1 1\n", content, 1)
    (folder / file).write_text(content)
    with pytest.raises(DataError, match=message):
        CUB200(tmp_path, "train")


def test_cub_missing_image_file(tmp_path):
    folder = write_cub(tmp_path)
    victim = next((folder / "images").rglob("*_0000.jpg"))
    victim.unlink()
    with pytest.raises(DataError, match=rf"{victim}: image file does not exist"):
        CUB200(tmp_path)
    ds = CUB200(tmp_path, bad_images="skip")
    assert len(ds) == 5 and ds.skipped == {str(victim): "image file does not exist"}


def test_nabirds_leaves_and_hierarchy(tmp_path):
    write_nabirds(tmp_path)
    ds = load_dataset("nabirds", tmp_path, "train")
    assert ds.classes == ["House Finch", "Purple Finch", "Song Sparrow", "Mallard"]  # 104 has no images
    assert ds.targets.tolist() == [0, 1, 2, 3]
    assert ds.reference_hierarchy == {
        "Finches": ["House Finch", "Purple Finch"],
        "Sparrows": ["Song Sparrow"],
        "Ducks": ["Mallard"],
    }
    orders = NABirds(tmp_path, "test", level=1)
    assert orders.reference_hierarchy == {
        "Perching Birds": ["House Finch", "Purple Finch", "Song Sparrow"],
        "Waterfowl": ["Mallard"],
    }
    img, _ = orders[0]
    assert img.size == (14, 10)


def test_nabirds_bad_hierarchy(tmp_path):
    folder = write_nabirds(tmp_path)
    (folder / "hierarchy.txt").write_text("100 10\n10 100\n")
    with pytest.raises(DataError, match=r"hierarchy.txt: cycle in the hierarchy"):
        NABirds(tmp_path)
    (folder / "hierarchy.txt").write_text("100 999\n")
    with pytest.raises(DataError, match=r"class id 999 is not listed"):
        NABirds(tmp_path)
    with pytest.raises(ConfigError, match=r"level"):
        NABirds(tmp_path, level=0)


# ---- registry ----------------------------------------------------------------------------------


def test_registry_errors(tmp_path):
    assert set(DATASETS) >= {"fashion_mnist", "cifar100", "cub", "nabirds", "folder"}
    with pytest.raises(ConfigError, match=r"unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match=r"only cifar100 has coarse labels"):
        load_dataset("cub", tmp_path, label="coarse")
    with pytest.raises(ConfigError, match=r"split='val'"):
        load_dataset("cifar100", tmp_path, "val")
    with pytest.raises(ConfigError, match=r"needs a root"):
        load_dataset("folder")

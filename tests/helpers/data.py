"""Writers of tiny datasets in the real on-disk formats, for the data tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from coarse2fine.data.idx import write_idx


def write_png(path: Path, size: tuple[int, int] = (12, 10), color: int | tuple[int, ...] = 128, mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_fashion_mnist(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict:
    """The four IDX files; image i of the split is filled with value i, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 28, 1).repeat(28, 2)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[prefix] = (images, labels)
    return out


FINE = [f"fine{i}" for i in range(6)]
COARSE = ["animals", "plants", "things"]


def write_cifar100(root: Path, n: int = 24, protocol: int = 2, str_meta: bool = True) -> Path:
    """``cifar-100-python/{train,test,meta}``: data dicts with bytes keys (as the real files load with
    ``encoding='bytes'``), meta with str keys; fine class f belongs to coarse class f // 2."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        fine = [i % len(FINE) for i in range(n)]
        batch = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 2 for f in fine],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        with open(folder / split, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    meta = {"fine_label_names": FINE, "coarse_label_names": COARSE}
    if not str_meta:
        meta = {k.encode(): [v.encode() for v in vals] for k, vals in meta.items()}
    with open(folder / "meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)
    return folder


def _write_lists(folder: Path, rows: list[tuple[str, str, int, int]], classes: list[tuple[int, str]]) -> None:
    """rows: (image id, relative path, class id, is_train)."""
    (folder / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (folder / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in classes))


def write_cub(root: Path, n_classes: int = 3, per_class: int = 4) -> Path:
    folder = root / "CUB_200_2011"
    names = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani"][:n_classes]
    classes = [(c + 1, f"{c + 1:03d}.{name}") for c, name in enumerate(names)]
    rows = []
    for cid, raw in classes:
        for k in range(per_class):
            image_id = len(rows) + 1
            rel = f"{raw}/{raw}_{k:04d}.jpg"
            path = folder / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16 + k, 12), (cid * 40, k * 30, 0)).save(path, format="JPEG")
            rows.append((str(image_id), rel, cid, int(k % 2 == 0)))
    _write_lists(folder, rows, classes)
    (folder / "bounding_boxes.txt").write_text("".join(f"{r[0]} 1 1 5 5\n" for r in rows))
    return folder


# NABirds: 0 root; 1, 2 orders; 10, 11 under 1; 20 under 2; leaves 100, 101 under 10; 102 under 11;
# 103 under 20; 104 (no images) under 20.
NAB_CLASSES = {
    0: "Birds",
    1: "Perching Birds",
    2: "Waterfowl",
    10: "Finches",
    11: "Sparrows",
    20: "Ducks",
    100: "House Finch",
    101: "Purple Finch",
    102: "Song Sparrow",
    103: "Mallard",
    104: "Wood Duck",
}
NAB_PARENTS = {1: 0, 2: 0, 10: 1, 11: 1, 20: 2, 100: 10, 101: 10, 102: 11, 103: 20, 104: 20}


def write_nabirds(root: Path, per_class: int = 2) -> Path:
    folder = root / "nabirds"
    rows = []
    for cid in (100, 101, 102, 103):
        for k in range(per_class):
            image_id = f"{cid:04d}{k:04d}-aaaa-bbbb"
            rel = f"{cid:04d}/{image_id}.jpg"
            path = folder / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (14, 10), (cid, 0, k * 50)).save(path, format="JPEG")
            rows.append((image_id, rel, cid, int(k % 2 == 0)))
    _write_lists(folder, rows, sorted(NAB_CLASSES.items()))
    (folder / "hierarchy.txt").write_text("".join(f"{c} {p}\n" for c, p in NAB_PARENTS.items()))
    return folder


def write_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (12, 10)) -> Path:
    """root/<class>/img_k.png, each image filled with a value derived from its class and index."""
    for c, (name, count) in enumerate(classes.items()):
        for k in range(count):
            write_png(root / name / f"img_{k}.png", size, (c * 60 % 256, k * 20 % 256, 7))
    return root


def write_learnable_fashion_mnist(
    root: Path,
    n_train: int = 200,
    n_test: int = 50,
    *,
    bar: tuple[int, int] = (2, 6),
    value: int = 240,
    shuffle: bool = False,
    seed: int = 0,
) -> Path:
    """Fashion-MNIST in its real format (gzipped IDX files) that a network learns: noise below 60 and, for
    class c, a bright bar over rows ``2c + bar[0]`` to ``2c + bar[1]``; the labels cycle through the classes
    (``shuffle``: in a random order)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        if shuffle:
            rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + bar[0] : 2 * c + bar[1], 4:24] = value
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root

"""Shared test helpers: untrained checkpoints of every model kind in the normal checkpoint format, and
small image trees. Nothing is trained: a checkpoint is a freshly built model (seeded) with its facts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from coarse2fine.compress import compress_model
from coarse2fine.config import load_config, to_dict
from coarse2fine.engine import save_checkpoint
from coarse2fine.facts import HDCNNFacts, RunFacts
from coarse2fine.hdcnn import compress_hdcnn
from coarse2fine.hierarchy import Hierarchy
from coarse2fine.recipes import build_model_and_objective
from coarse2fine.recipes.compress import compressed_checkpoint
from helpers.hdcnn import TinyBlock

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
# overlapping partial sets (class 2 in two of them) and a one-class set (no network runs for it)
PARTIAL_SETS = [[0, 1, 2], [2, 3], [4], [5]]
COARSE_OF = [0, 0, 0, 1, 2, 3]
TINY_VGG = {"width_mult": 0.125, "hidden": [16]}

# name -> (method, model name, model kwargs, channels, image size, extra recipe overrides)
KINDS: dict[str, tuple[str, str, dict[str, Any], int, int, list[str]]] = {
    "plain": ("plain", "vgg_small_bn", TINY_VGG, 1, 28, []),
    "herbs": ("herbs", "vgg_small_bn", TINY_VGG, 1, 28, ["herbs.fpn_size=16"]),
    "hdcnn": ("hdcnn", "test_tiny_block", {}, 3, 8, ["hdcnn.branch_stage=stage1"]),
    "tiny": ("plain", "test_tiny_block", {}, 3, 8, []),
}


def tiny_block(num_classes: int, in_chans: int, **kwargs: Any) -> TinyBlock:
    """Builder of ``test_tiny_block`` (``models.register_model``): the HD-CNN tests' tiny stand-in block."""
    return TinyBlock(num_classes, in_chans, width=8)


def _perturb_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so that a wrongly loaded buffer shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)


def make_checkpoint(
    path: Path,
    kind: str = "plain",
    *,
    compressed: bool = False,
    in_memory: bool = False,
    overrides: Sequence[str] = (),
    classes: Sequence[str] = CLASSES,
) -> Path:
    """An untrained checkpoint of ``kind`` (``KINDS``) saved with ``save_checkpoint`` at ``path``.

    ``compressed``: product-quantised (the head's hidden FC of a VGG; HD-CNN's coarse and fine heads).
    The ``hdcnn`` and ``tiny`` kinds need ``test_tiny_block`` registered (see ``tiny_block`` in the tests using it).
    """
    method, name, kwargs, chans, size, extra = KINDS[kind]
    cfg = load_config(
        None,
        [
            f"method={method}",
            f"model.name={name}",
            f"model.kwargs={kwargs}",
            f"data.image_size={size}",
            "data.workers=0",
            "data.batch_size=4",
            "train.device=cpu",
            *extra,
            *overrides,
        ],
    )
    stats = {"mean": [0.4] * chans, "std": [0.25] * chans}
    hdcnn = None
    if method == "hdcnn":
        names = [f"g{k}" for k in range(len(PARTIAL_SETS))]
        hierarchy = Hierarchy(list(classes), COARSE_OF, PARTIAL_SETS, names).to_dict()
        hdcnn = HDCNNFacts(hierarchy, cfg.hdcnn.branch_stage, name, [0.4, 0.3, 0.15, 0.15])
    facts = RunFacts(chans, size, stats, in_memory, list(classes), hdcnn)
    model, _ = build_model_and_objective(cfg, facts, load_files=False)
    _perturb_batch_norm(model, seed=1)
    model.eval()
    ckpt: dict[str, Any] = {
        "model": model.state_dict(),
        "config": to_dict(cfg),
        "classes": list(classes),
        "metadata": facts.to_dict(),
        "epoch": 0,
    }
    if compressed:
        if method == "hdcnn":
            report: Any = compress_hdcnn(model, {"coarse": {"head.3": (2, 4)}, "fine": {"head.3": (2, 4)}})
        else:
            report = compress_model(model, {"head.fc1": (4, 8)})
        ckpt = compressed_checkpoint(ckpt, model, report)
    save_checkpoint(ckpt, path)
    return path


def write_image(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", seed: int = 0) -> Path:
    """A random image file (PNG or JPEG by the extension) of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def image_tree(root: Path) -> tuple[list[str], Path]:
    """Nested folders of PNG / JPEG images of several sizes, one corrupt file, a hidden file and a text file.

    Returns the readable images' paths (sorted) and the corrupt file.
    """
    good = [
        write_image(root / "a" / "one.png", (12, 10), seed=1),
        write_image(root / "a" / "deep" / "er" / "two.jpg", (16, 16), seed=2),
        write_image(root / "b" / "three.png", (9, 14), "L", seed=3),
        write_image(root / "four.png", (20, 8), seed=4),
    ]
    write_image(root / "a" / ".hidden.png", seed=5)
    (root / "b" / "notes.txt").write_text("not an image")
    corrupt = root / "a" / "deep" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    return sorted(str(p) for p in good), corrupt

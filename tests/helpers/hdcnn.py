"""Tiny stand-in building block for the HD-CNN tests (a real ``Backbone`` subclass)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coarse2fine.config import RunConfig, load_config
from coarse2fine.hdcnn.model import FineComponents
from coarse2fine.models.base import Backbone, StageInfo
from helpers.data import write_learnable_fashion_mnist


class TinyBlock(Backbone):
    """conv-BN-ReLU-pool | conv-BN-ReLU | avg-pool, dropout, Linear: 3 modules, 2 split points."""

    def __init__(self, num_classes: int = 6, in_chans: int = 1, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = (in_chans, 8, 8)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(width, num_classes))
        self.feature_info = [StageInfo("stage1", width, 2, "stem"), StageInfo("stage2", width, 2, "body")]

    def sequence(self) -> list[tuple[str, nn.Module]]:
        return [("stem", self.stem), ("body", self.body), ("head", self.head)]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        s1 = self.stem(x)
        return [s1, self.body(s1)]

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head[-1] = nn.Linear(self.head[-1].in_features, num_classes)


def write_fashion_mnist(root: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Tiny Fashion-MNIST in the real format, labels shuffled; class j is a bright bar at rows 2j + 3 to 2j + 6."""
    return write_learnable_fashion_mnist(root, n_train, n_test, bar=(3, 6), value=255, shuffle=True, seed=seed)


def old_layout_state(model: Any, seed: int = 1) -> dict[str, Tensor]:
    """``model.state_dict()`` as the earlier layout stored it: a fine component stacked for *every* partial
    set, one-class ones included (random weights there, never used), in a ``FineComponents`` over all K;
    the product-quantised weights of ``model.fine`` get K code / centre tables (the one-class slots:
    another component's)."""
    gen = torch.Generator().manual_seed(seed)
    comps = []
    for k in range(model.num_coarse):
        if k in model.runnable:
            comps.append(model.fine.component(model.slot(k)))
        else:
            extra = model.fine.component(0)
            with torch.no_grad():
                for p in extra.parameters():
                    p.add_(torch.randn(p.shape, generator=gen))
            comps.append(extra)
    old = FineComponents(comps)
    order = [model.slot(k) if k in model.runnable else 0 for k in range(model.num_coarse)]
    for name, (s, k, axis) in model.fine.quantised().items():
        mangled = name.replace(".", "__")
        codes, centers = (getattr(model.fine, f"{mangled}__{part}")[order] for part in ("codes", "centers"))
        old.set_quantized(name, s, k, axis, codes, centers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fine.")}
    state.update({f"fine.{k}": v for k, v in old.state_dict().items()})
    return state


TINY_BLOCK = "test_tiny_block"  # the model name tests register tiny_block_builder under


def tiny_block_builder(num_classes: int, in_chans: int, **kwargs: object) -> TinyBlock:
    return TinyBlock(num_classes, in_chans, width=8)


def make_cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    root = write_fashion_mnist(tmp_path / "fmnist", n_train=150, n_test=60)
    return load_config(
        None,
        [
            "name=tiny",
            "method=hdcnn",
            f"out_dir={tmp_path / 'runs'}",
            "data.name=fashion_mnist",
            f"data.root={root}",
            "data.val_fraction=0.2",
            "data.batch_size=30",
            "data.workers=0",
            "data.pad=0",
            "optim.lr=0.05",
            "schedule.name=constant",
            "train.epochs=1",
            "train.threads=1",
            "train.device=cpu",
            "train.amp='off'",
            "hdcnn.num_coarse=3",
            "hdcnn.branch_stage=stage1",
            "hdcnn.fine_epochs=1",
            "hdcnn.finetune_epochs=1",
            "hdcnn.beta_sweep=[1.0, 2.0]",
            f"model.name={TINY_BLOCK}",
            *overrides,
        ],
    )

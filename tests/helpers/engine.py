"""Helpers for the engine tests (no tests here): a tiny separable problem, a tiny model, a loader that
follows the loader contract, and a worker entry point for the subprocess tests
(``python tests/helpers/engine.py --run-dir D ...``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coarse2fine.config import OptimConfig, ScheduleConfig, TrainConfig
from coarse2fine.engine import CrossEntropyObjective, FitResult, FitSetup, Objective, RunFolder, fit, predict_proba
from coarse2fine.engine import distributed as du
from coarse2fine.errors import C2FError

CLASSES = ["north_west", "north_east", "south_west", "south_east"]
SIZE = 8
STEPS_PER_EPOCH = 8  # make_loaders(): 256 training samples / batch 32
EPOCHS = 3  # of the reference run


class TinyDataset:
    """Class k has a bright 4x4 square in quadrant k of an 8x8 noisy image (linearly separable)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % len(CLASSES)
        y = y[torch.randperm(n, generator=g)]
        x = 0.6 * torch.randn(n, 1, SIZE, SIZE, generator=g)
        half = SIZE // 2
        for k in range(len(CLASSES)):
            r, c = (k // 2) * half, (k % 2) * half
            x[y == k, :, r : r + half, c : c + half] += 1.0
        self.images, self.labels = x, y
        self.classes = list(CLASSES)
        self.targets = y.numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


class TinyLoader:
    """Loader contract: permutation seeded by (seed, epoch), shard ``perm[rank::world_size]``."""

    def __init__(
        self,
        dataset: TinyDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_shards: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.pad_shards = seed, rank, world_size, pad_shards
        self.epoch = 0
        self.on_batch = on_batch
        self.batches_served = 0  # over the loader's life (for fault injection)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor:
        n = len(self.dataset)
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 10_000 + self.epoch))
        else:
            perm = torch.arange(n)
        if self.pad_shards and n % self.world_size:
            perm = torch.cat([perm, perm[: self.world_size - n % self.world_size]])
        return perm[self.rank :: self.world_size]

    @property
    def num_samples(self) -> int:
        return len(self._indices())

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices()
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            if self.on_batch is not None:
                self.on_batch(self.batches_served)
            self.batches_served += 1
            yield self.dataset.images[sel], self.dataset.labels[sel]


class TinyNet(nn.Module):
    """conv(1->4) + ReLU + 2x2 avg-pool + linear: no BatchNorm, no dropout. ``heads=True``: dict output."""

    def __init__(self, heads: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * (SIZE // 2) ** 2, len(CLASSES))
        self.aux = nn.Linear(4 * (SIZE // 2) ** 2, len(CLASSES)) if heads else None

    def forward(self, x: Tensor) -> Any:
        f = torch.flatten(nn.functional.avg_pool2d(torch.relu(self.conv(x)), 2), 1)
        logits = self.fc(f)
        if self.aux is None:
            return logits
        return {"logits": logits, "heads": {"aux": self.aux(f)}}


def configs(**train: Any) -> tuple[TrainConfig, OptimConfig, ScheduleConfig]:
    base: dict[str, Any] = {"epochs": 3, "device": "cpu", "amp": "off", "deterministic": True, "threads": 1}
    base.update(train)
    return (
        TrainConfig(**base),
        OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4),
        ScheduleConfig(name="cosine", warmup_epochs=0.5),
    )


def setup_of(metadata: dict[str, Any] | None = None, **train: Any) -> FitSetup:
    """The settings of ``configs(**train)`` for the tiny problem (seed 0, no progress bars)."""
    tcfg, ocfg, scfg = configs(**train)
    return FitSetup(tcfg, ocfg, scfg, CLASSES, seed=0, config={"seed": 0}, metadata=metadata or {}, progress=False)


def make_loaders(
    batch_size: int = 32, rank: int = 0, world_size: int = 1, n_train: int = 256, n_val: int = 64, **kw: Any
) -> tuple[TinyLoader, TinyLoader]:
    train = TinyLoader(TinyDataset(n_train, seed=1), batch_size, rank=rank, world_size=world_size, **kw)
    val = TinyLoader(
        TinyDataset(n_val, seed=2),
        16,
        shuffle=False,
        drop_last=False,
        rank=rank,
        world_size=world_size,
        pad_shards=False,
    )
    return train, val


class NaNAt(Objective):
    """Cross-entropy whose ``at``-th call (0-based) returns NaN."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.ce, self.at, self.calls = CrossEntropyObjective(), at, 0

    def forward(self, outputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.ce(outputs, targets)
        if self.calls == self.at:
            terms["loss"] = terms["loss"] * float("nan")
        self.calls += 1
        return terms


def make_model(heads: bool = False) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(heads=heads)


def run(
    run_dir: Path,
    *,
    epochs: int = 3,
    resume: bool = False,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
    objective: Objective | None = None,
    **train: Any,
) -> tuple[TinyNet, FitResult]:
    model = make_model()
    tr, va = make_loaders(batch_size, rank, world_size, on_batch=on_batch)
    objective = objective if objective is not None else CrossEntropyObjective()
    setup = setup_of(epochs=epochs, **train)
    result = fit(model, objective, tr, va, setup, RunFolder(run_dir, resume=resume))
    return model, result


def comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History without wall-clock columns."""
    drop = {"seconds", "train_seconds", "images_per_s"}
    return [{k: v for k, v in rec.items() if k not in drop} for rec in history]


def reference_run(run_dir: Path) -> dict[str, Any]:
    """An uninterrupted ``EPOCHS``-epoch run: final weights, comparable history, the FitResult."""
    model, result = run(run_dir, epochs=EPOCHS)
    return {"state": model.state_dict(), "history": comparable(result.history), "result": result}


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


def _eval_loader(n: int, seed: int, rank: int, world_size: int) -> TinyLoader:
    return TinyLoader(
        TinyDataset(n, seed=seed), 8, shuffle=False, drop_last=False, rank=rank, world_size=world_size, pad_shards=False
    )


def _worker() -> int:
    """Subprocess entry: train (optionally signalling itself at a batch); with ``--out``, save the final
    weights, history and gathered probabilities to ``<out>.rank<r>.pt``. ``--nan-run-dir``: then train
    again there with a NaN loss on rank ``--nan-rank`` only (policy skip), saved to ``<out>.nan.rank<r>.pt``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--signal-at", type=int, default=None, help="batch at which to signal itself")
    ap.add_argument("--signal", default="SIGKILL")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--nan-run-dir", type=Path, default=None)
    ap.add_argument("--nan-at", type=int, default=11, help="loss call (0-based) that gives NaN ...")
    ap.add_argument("--nan-rank", type=int, default=1, help="... on this rank only")
    args = ap.parse_args()
    info = du.init_distributed(device="cpu")
    rank, world = info.rank, info.world_size
    on_batch = None
    if args.signal_at is not None:
        sig = getattr(signal, args.signal)

        def on_batch(i: int) -> None:
            if i == args.signal_at:
                os.kill(os.getpid(), sig)

    common = {"epochs": args.epochs, "batch_size": args.batch_size, "rank": rank, "world_size": world}
    try:
        model, result = run(args.run_dir, resume=args.resume, on_batch=on_batch, **common)
    except C2FError as exc:  # TrainingInterrupted: what the CLI does
        print(f"error: {exc}", file=sys.stderr)
        du.cleanup()
        return 2
    if args.out is not None:
        # probabilities on an odd-sized split (uneven shards) and on a 1-image split (rank 1's shard is
        # empty), gathered back into order on every rank
        probs, targets = predict_proba(model, _eval_loader(61, 3, rank, world), device="cpu")
        probs_one, _ = predict_proba(model, _eval_loader(1, 4, rank, world), device="cpu")
        torch.save(
            {
                "model": model.state_dict(),
                "history": comparable(result.history),
                "probs": torch.from_numpy(probs),
                "targets": torch.from_numpy(targets),
                "probs_one": torch.from_numpy(probs_one),
            },
            args.out.with_suffix(f".rank{rank}.pt"),
        )
    if args.nan_run_dir is not None:
        nan = NaNAt(args.nan_at) if rank == args.nan_rank else None
        model, result = run(args.nan_run_dir, objective=nan, nan_policy="skip", **common)
        torch.save(
            {"model": model.state_dict(), "history": comparable(result.history)},
            args.out.with_suffix(f".nan.rank{rank}.pt"),
        )
    du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())

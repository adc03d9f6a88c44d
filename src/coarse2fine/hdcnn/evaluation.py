"""Test-time measurements of HD-CNN (METHODS.md §2.4): conditional execution sweep, time, memory, plots.

``inference_pass`` runs a model over a loader once and returns predictions, top-1/top-5, the fine
components run per image and the model's time per image (forward passes only, data loading
excluded). ``peak_memory_bytes`` measures the peak memory allocated during one forward pass:
``torch.cuda.max_memory_allocated`` on CUDA, the profiler's allocation trace on the CPU.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coarse2fine.engine.checkpoint import atomic_write
from coarse2fine.engine.evaluate import autocast, autocast_dtype, to_device
from coarse2fine.engine.objective import logits_of


@dataclass
class PassResult:
    """One pass over a split: predictions and what it cost."""

    pred: np.ndarray  # (N,) top-1 fine class
    target: np.ndarray  # (N,)
    top5_correct: int
    coarse_pred: np.ndarray | None  # (N,) argmax_k B_ik (HD-CNN only)
    components_run: float | None  # mean fine components run per image (HD-CNN only)
    seconds: float  # forward passes only

    @property
    def num_samples(self) -> int:
        return int(self.target.shape[0])

    @property
    def top1(self) -> float:
        return float((self.pred == self.target).mean()) if self.num_samples else 0.0

    @property
    def top5(self) -> float:
        return self.top5_correct / self.num_samples if self.num_samples else 0.0

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(self.num_samples, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def inference_pass(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device,
    beta: float | None = None,
    amp: str | None = "off",
    channels_last: bool = False,
) -> PassResult:
    """Predictions of ``model`` on ``loader``; HD-CNN models get ``beta`` (None: all components)."""
    model.eval()
    dtype = autocast_dtype(amp, device)
    hdcnn = hasattr(model, "num_coarse")
    preds, targets, coarse, runs = [], [], [], []
    top5 = 0
    seconds = 0.0
    for images, labels in loader:
        images, labels = to_device(images, labels, device, channels_last)
        _sync(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            out = model(images, beta=beta) if hdcnn else model(images)
        _sync(device)
        seconds += time.perf_counter() - start
        logits = logits_of(out).float()
        preds.append(logits.argmax(1).cpu())
        targets.append(labels.cpu())
        k = min(5, logits.shape[1])
        top5 += int((logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum())
        if hdcnn:
            coarse.append(out["coarse_probs"].argmax(1).cpu())
            runs.append(out["components_run"].cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0, dtype=np.int64)
    return PassResult(
        pred=cat(preds),
        target=cat(targets),
        top5_correct=top5,
        coarse_pred=cat(coarse) if hdcnn else None,
        components_run=float(torch.cat(runs).float().mean()) if runs else None,
        seconds=seconds,
    )


@torch.inference_mode()
def peak_memory_bytes(model: nn.Module, images: Tensor, **kwargs: Any) -> int:
    """Peak memory allocated while ``model(images)`` runs, above what was allocated before it."""
    model.eval()
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
        base = torch.cuda.memory_allocated(images.device)
        torch.cuda.reset_peak_memory_stats(images.device)
        model(images, **kwargs)
        torch.cuda.synchronize(images.device)
        return int(torch.cuda.max_memory_allocated(images.device) - base)
    from torch.profiler import ProfilerActivity, profile

    # libkineto writes every profiler start / stop (and, without a GPU, a failed device probe) to stderr;
    # a level above its ERROR level keeps the screen clean unless the user chose a level
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(images, **kwargs)
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    return int(max(itertools.accumulate(v for _, v in events), default=0))


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy and time per image against beta (one point per row of the beta sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = [str(r["beta"]) if r["beta"] is not None else "all" for r in rows]
    xs = np.arange(len(rows))
    ax[0].plot(xs, [100 * r["top1"] for r in rows], "o-")
    ax[0].set_ylabel("top-1 accuracy (%)")
    ax[1].plot(xs, [r["ms_per_image"] for r in rows], "o-", label="time per image (ms)")
    ax[1].set_ylabel("ms per image")
    twin = ax[1].twinx()
    twin.plot(xs, [r["components_run"] for r in rows], "s--", color="tab:orange")
    twin.set_ylabel("fine components run per image", color="tab:orange")
    for a in ax:
        a.set_xticks(xs, labels)
        a.set_xlabel("beta (threshold 1/(beta K))")
        a.grid(alpha=0.3)
    fig.suptitle(title or "HD-CNN conditional execution: accuracy and time vs beta")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path

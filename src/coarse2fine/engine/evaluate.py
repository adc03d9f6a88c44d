"""Evaluation: top-1/top-5, per-class accuracy, confusion matrix, per-head accuracy; probabilities.

Works on any model output of the training contract (a logits tensor, or a dict with ``"logits"`` and
optional ``"heads"``). Under several processes each rank evaluates its own shard (loader contract,
``pad_shards=False``) and the confusion matrices and counts are summed with ``all_reduce``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coarse2fine.engine import distributed as du
from coarse2fine.engine.checkpoint import atomic_write, atomic_write_json
from coarse2fine.engine.objective import Objective, heads_of, logits_of
from coarse2fine.engine.progress import progress as progress_of
from coarse2fine.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    top1: float
    top5: float
    per_class: list[float]  # accuracy of each class (nan for a class with no sample)
    confusion: np.ndarray  # (C, C) int64, rows = true class, columns = predicted class
    heads: dict[str, float] = field(default_factory=dict)  # extra head name -> top-1
    loss: float | None = None
    num_samples: int = 0
    seconds: float = 0.0

    @property
    def mean_class_accuracy(self) -> float:
        vals = [v for v in self.per_class if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def precision_recall_f1(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class precision, recall and F1 (scikit-learn, 0 where undefined) from the confusion matrix."""
        from sklearn.metrics import precision_recall_fscore_support

        c = self.confusion.shape[0]
        true = np.repeat(np.arange(c), self.confusion.sum(1))
        pred = np.concatenate([np.repeat(np.arange(c), row) for row in self.confusion]) if c else true
        p, r, f, _ = precision_recall_fscore_support(true, pred, labels=list(range(c)), zero_division=0)
        return p, r, f

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able summary (a class without samples gets ``null`` accuracy)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.per_class))]
        precision, _, f1 = self.precision_recall_f1() if self.num_samples else ([], [], [])
        present = [i for i, v in enumerate(self.per_class) if not math.isnan(v)]
        return {
            "top1": self.top1,
            "top5": self.top5,
            "mean_class_accuracy": _json_float(self.mean_class_accuracy),
            "macro_f1": float(np.mean([f1[i] for i in present])) if present else None,
            "per_class_precision": {n: float(v) for n, v in zip(names, precision)},
            "per_class_f1": {n: float(v) for n, v in zip(names, f1)},
            "loss": self.loss,
            "num_samples": self.num_samples,
            "seconds": self.seconds,
            "heads": dict(self.heads),
            "per_class": {n: _json_float(v) for n, v in zip(names, self.per_class)},
        }


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None: the local rank's GPU when CUDA is available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda", du.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", du.local_rank())
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise ConfigError(f"train.device={device}: this machine has {have}; --set train.device=cpu (or auto)")
    return dev


def apply_threads(threads: int | None) -> None:
    """``train.threads``: the number of CPU threads torch uses (None leaves torch's choice); the one
    place the setting is applied (training, evaluation and loading a checkpoint call it)."""
    if threads:
        torch.set_num_threads(threads)


def autocast_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, off on CPU; ``bf16``/``fp16``: that dtype; ``off``/None: full precision."""
    amp = (amp or "off").lower()
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "bf16":
        if device.type == "cpu" and cpu_native_bf16() is False:
            _warn_emulated_bf16()
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "off":
        return None
    raise ConfigError(f"train.amp: unknown value {amp!r}; choose auto, bf16, fp16 or off")


@functools.cache
def cpu_native_bf16() -> bool | None:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX, from ``/proc/cpuinfo``); None: unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def _warn_emulated_bf16() -> None:
    log.warning(
        "train.amp=bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag): it is emulated and can "
        "be slower than fp32; --set train.amp=off"
    )


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(images: Tensor, targets: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    if channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=non_blocking)


def _batches(loader: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    """``loader`` with a progress bar (a terminal) or plain progress lines (a log), on rank 0."""
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    return progress_of(loader, total=total, desc=desc, enabled=progress and du.is_main_process(), every_pct=20)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_classes: int,
    device: str | torch.device | None = None,
    amp: str | None = "auto",
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
    objective: Objective | None = None,
) -> EvalResult:
    """Accuracy metrics of ``model`` on ``loader`` (summed over all ranks)."""
    start = time.perf_counter()
    dev = resolve_device(device)
    net = du.unwrap(model).to(dev)  # a model loaded on the CPU follows the data to the device
    was_training = net.training
    net.eval()
    dtype = autocast_dtype(amp, dev)
    c = num_classes
    confusion = torch.zeros(c * c, dtype=torch.int64, device=dev)
    top5_correct = torch.zeros((), dtype=torch.int64, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    head_names: list[str] | None = None
    head_correct: Tensor | None = None
    try:
        for images, targets in _batches(loader, progress, desc):
            images, targets = to_device(images, targets, dev, channels_last)
            with autocast(dev, dtype):
                outputs = net(images)
                if objective is not None:
                    loss_sum += objective(outputs, targets)["loss"].double() * targets.shape[0]
            logits = logits_of(outputs).float()
            pred = logits.argmax(1)
            confusion += torch.bincount(targets * c + pred, minlength=c * c)
            k = min(5, c)
            top5_correct += (logits.topk(k, dim=1).indices == targets[:, None]).any(1).sum()
            heads = heads_of(outputs)
            if head_names is None:
                head_names = sorted(heads)
                head_correct = torch.zeros(len(head_names), dtype=torch.int64, device=dev)
            for i, name in enumerate(head_names):
                head_correct[i] += (heads[name].argmax(1) == targets).sum()  # type: ignore[index]
    finally:
        net.train(was_training)
    head_names = head_names or []
    head_correct = head_correct if head_correct is not None else torch.zeros(0, dtype=torch.int64, device=dev)
    # every count in one all_reduce (all ranks run the same model, so the same heads)
    packed = du.all_reduce_sum(torch.cat([confusion, top5_correct[None], head_correct]))
    if objective is not None:
        du.all_reduce_sum(loss_sum)
    conf = packed[: c * c].view(c, c).cpu().numpy().astype(np.int64)
    top5 = int(packed[c * c].item())
    hc = packed[c * c + 1 : c * c + 1 + len(head_names)].cpu().tolist()
    n = int(conf.sum())
    rows = conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(rows > 0, np.diag(conf) / np.maximum(rows, 1), np.nan)
    return EvalResult(
        top1=float(np.trace(conf) / n) if n else 0.0,
        top5=top5 / n if n else 0.0,
        per_class=[float(v) for v in per_class],
        confusion=conf,
        heads={name: (hc[i] / n if n else 0.0) for i, name in enumerate(head_names)},
        loss=float(loss_sum.item() / n) if objective is not None and n else None,
        num_samples=n,
        seconds=time.perf_counter() - start,
    )


@torch.inference_mode()
def predict_proba(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    amp: str | None = "auto",
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``(N, C)`` float32 and targets ``(N,)`` int64, in dataset order.

    Under several processes the shards (``indices[rank::world_size]``, unshuffled) are gathered
    and interleaved back into order on every rank.
    """
    dev = resolve_device(device)
    net = du.unwrap(model).to(dev)  # a model loaded on the CPU follows the data to the device
    was_training = net.training
    net.eval()
    dtype = autocast_dtype(amp, dev)
    probs: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for images, targets in _batches(loader, progress, desc):
            images, targets = to_device(images, targets, dev, channels_last)
            with autocast(dev, dtype):
                outputs = net(images)
            probs.append(torch.softmax(logits_of(outputs).float(), dim=1))
            labels.append(targets)
    finally:
        net.train(was_training)
    p = torch.cat(probs) if probs else torch.zeros(0, 0, device=dev)
    t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=dev)
    p, t = du.gather_interleaved(p), du.gather_interleaved(t)
    return p.cpu().numpy().astype(np.float32), t.cpu().numpy().astype(np.int64)


def save_eval_artifacts(
    result: EvalResult, out_dir: str | Path, class_names: Sequence[str], prefix: str = "test"
) -> dict[str, Path]:
    """Write ``<prefix>_metrics.json`` (atomically), ``<prefix>_confusion.npy`` and ``_confusion.png``.

    The picture uses row-normalised colours with class names on both axes; counts are written in
    the cells when there are at most 20 classes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}_" if prefix else ""
    paths = {
        "metrics": out / f"{stem}metrics.json",
        "confusion_npy": out / f"{stem}confusion.npy",
        "confusion_png": out / f"{stem}confusion.png",
    }
    atomic_write_json(paths["metrics"], result.to_dict(class_names))
    atomic_write(paths["confusion_npy"], lambda f: np.save(f, result.confusion))
    plot_confusion(result.confusion, class_names, paths["confusion_png"], title=f"{prefix or 'eval'} confusion")
    return paths


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    c = confusion.shape[0]
    rows = confusion.sum(1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=np.float64), where=rows > 0)
    size = min(40.0, max(5.0, 0.35 * c + 2))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    try:
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
        font = max(3.0, min(9.0, 300.0 / max(c, 1)))
        ax.set_xticks(range(c), labels=list(class_names), rotation=90, fontsize=font)
        ax.set_yticks(range(c), labels=list(class_names), fontsize=font)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if title:
            ax.set_title(title)
        if c <= 20:
            for i in range(c):
                for j in range(c):
                    ax.text(
                        j,
                        i,
                        str(int(confusion[i, j])),
                        ha="center",
                        va="center",
                        fontsize=font,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return Path(path)


def metrics_from_probs(probs: np.ndarray, targets: np.ndarray, num_classes: int, seconds: float = 0.0) -> EvalResult:
    """The metrics of :func:`evaluate` from already computed class probabilities ``(N, C)``.

    Used by the test protocols (multi-crop, dense, fusion) that average several views' softmax.
    """
    probs_t = torch.as_tensor(probs, dtype=torch.float32)
    t = torch.as_tensor(targets, dtype=torch.int64)
    c = num_classes
    pred = probs_t.argmax(1)
    confusion = torch.bincount(t * c + pred, minlength=c * c).view(c, c)
    k = min(5, c)
    top5 = (probs_t.topk(k, dim=1).indices == t[:, None]).any(1).sum().item()
    n = int(t.numel())
    support = confusion.sum(1)
    per_class = torch.where(support > 0, confusion.diag() / support.clamp(min=1), torch.tensor(float("nan")))
    return EvalResult(
        top1=float(confusion.diag().sum().item() / max(1, n)),
        top5=float(top5 / max(1, n)),
        per_class=[float(v) for v in per_class.tolist()],
        confusion=confusion.numpy().astype(np.int64),
        num_samples=n,
        seconds=seconds,
    )

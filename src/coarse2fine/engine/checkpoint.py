"""Checkpoints: atomic writes, safe loading (``weights_only=True`` always) and compatibility checks.

Layout of a training checkpoint (every value loadable with ``weights_only=True``)::

    {"model", "optimizer", "scheduler", "scaler", "epoch" (completed epochs), "global_step",
     "best_metric", "best_epoch", "history", "rng", "config", "classes", "metadata", "world_size"}

plus ``"ema"`` (the EMA weights) when ``train.ema_decay`` is set.

A save goes to a temporary file in the same directory, is flushed and fsynced, then renamed over the
target with ``os.replace``: a crash or a full disk during a save leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from coarse2fine.engine.distributed import unwrap
from coarse2fine.errors import CheckpointError, describe_differences


def _torch_write(obj: Any, f: IO[bytes]) -> None:
    torch.save(obj, f)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` via ``writer(file)`` into a same-directory temp file, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask like open() would
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # torch.save reports a failed write (e.g. a full disk) as a RuntimeError wrapping the OS error
        if isinstance(exc, (OSError, RuntimeError)):
            cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"could not write {path}: {cause} ({free:,} bytes free on that disk); the previous file is unchanged"
            ) from exc
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically (``dst`` is either the old or the complete new file)."""

    def copy(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, length=1 << 20)

    return atomic_write(dst, copy)


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Save ``state`` atomically with ``torch.save`` (the writer is ``_torch_write``)."""
    return atomic_write(path, lambda f: _torch_write(dict(state), f))


def plain_data(value: Any, where: str) -> Any:
    """``value`` as weights_only-loadable plain data (numpy scalars/arrays become Python numbers/lists)."""
    if isinstance(value, Mapping):
        return {str(k): plain_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool, Tensor)):
        return value
    raise CheckpointError(f"checkpoint {where}: {type(value).__name__} is not plain data (JSON-like or tensors)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything else is a ``CheckpointError`` naming it.

    A file carrying pickled code (classes, functions, ``__reduce__`` payloads) is refused unexecuted.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds pickled objects other than tensors and plain data "
            f"(refused, nothing was executed): {_unpickler_reason(exc)}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or truncated: {_unpickler_reason(exc)}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def _unpickler_reason(exc: BaseException) -> str:
    """What torch's loader refused, without its advice to retry with ``weights_only=False`` (unsafe)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), None)
    if reason is None:
        reason = next((ln for ln in lines if "weights_only" not in ln and "trust the source" not in ln), "")
    return (reason or type(exc).__name__)[:300]


def model_state_of(checkpoint: Mapping[str, Any], path: str | Path | None = None) -> Mapping[str, Any]:
    """The model state dict of a training checkpoint (or of a bare state dict)."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {_name(path)}: 'model' is not a state dict")
    return state


def _name(path: str | Path | None) -> str:
    return repr(str(path)) if path is not None else "(in memory)"


def check_classes(saved: Sequence[str], classes: Sequence[str], where: str, other: str = "the data") -> None:
    """The one class-list check: ``saved`` (a checkpoint's) must equal ``classes`` (``other``'s), in order."""
    saved, classes = list(saved), list(classes)
    if len(saved) != len(classes):
        raise CheckpointError(f"{where} was trained on {len(saved)} classes, {other} has {len(classes)}")
    for i, (a, b) in enumerate(zip(saved, classes)):
        if a != b:
            raise CheckpointError(f"{where}: class {i} is {a!r} in the checkpoint but {b!r} in {other}")


def check_compatible(
    checkpoint: Mapping[str, Any],
    classes: Sequence[str] | None,
    model: nn.Module | None,
    path: str | Path | None = None,
) -> None:
    """Raise ``CheckpointError`` naming the first mismatch in class list or architecture keys/shapes."""
    where = f"checkpoint {_name(path)}"
    saved = checkpoint.get("classes")
    if classes is not None and saved is not None:
        check_classes(saved, classes, where)
    if model is None:
        return
    state = model_state_of(checkpoint, path)
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        diff = describe_differences(("missing {n} key(s) e.g.", missing), ("unexpected {n} key(s) e.g.", unexpected))
        raise CheckpointError(f"{where} does not match the model architecture: {diff}")
    for k, v in own.items():
        other = state[k]
        if hasattr(other, "shape") and tuple(other.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{where}: parameter {k!r} has shape {tuple(other.shape)} in the checkpoint "
                f"but {tuple(v.shape)} in the model"
            )


# ---- RNG state as weights_only-loadable data ----------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Torch CPU/CUDA, numpy and Python RNG states as tensors and lists (no numpy objects)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_version, list(py_internal), py_gauss],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))

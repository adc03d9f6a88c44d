"""Data-parallel helpers around ``torch.distributed`` for processes launched by ``torchrun``.

One process (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) is the no-op case: every
helper then works without a process group. Backend: ``nccl`` when CUDA is available, else ``gloo``.
Only rank 0 writes files; checkpoints hold the unwrapped model, so a run can resume on any number
of processes (see ``docs/DISTRIBUTED.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from coarse2fine.config import quote
from coarse2fine.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: single process, no process group


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={quote(raw)} is not an integer") from exc


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, *, device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_*`` env vars.

    A no-op (returns rank 0 of 1) when the environment names a single process. Idempotent.
    Backend: ``backend``, else ``$C2F_DIST_BACKEND``, else ``gloo`` when ``device`` (``train.device``)
    is ``cpu`` or CUDA is missing, else ``nccl``.
    """
    if is_initialized():
        return DistInfo(rank(), world_size(), local_rank(), dist.get_backend())
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return DistInfo(0, 1, 0, None)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with torchrun (docs/DISTRIBUTED.md)"
        )
    local = _env_int("LOCAL_RANK", 0)
    backend = backend or os.environ.get("C2F_DIST_BACKEND") or None
    if backend is None:
        on_cpu = device is not None and str(device).startswith("cpu")
        backend = "nccl" if torch.cuda.is_available() and not on_cpu else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend)


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks in place and return it (identity for one process)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_interleaved(tensor: Tensor) -> Tensor:
    """Gather each rank's rows and put them back in dataset order.

    Evaluation loaders shard an unshuffled split as ``indices[rank::world_size]`` (loader contract,
    ``pad_shards=False``), so row ``j`` of rank ``r`` is sample ``j * world_size + r``.
    """
    size = world_size()
    if size == 1:
        return tensor
    shape = torch.tensor(tensor.shape, device=tensor.device, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape)
    counts = [int(s[0].item()) for s in shapes]
    row = tuple(int(v) for v in torch.stack(shapes)[:, 1:].max(0).values)  # a rank without rows: (0, 0)
    padded = tensor.new_zeros((max(counts), *row))
    if tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    out = tensor.new_empty((sum(counts), *row))
    for r, (part, count) in enumerate(zip(parts, counts)):
        out[r::size] = part[:count]
    return out


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **kwargs: object) -> nn.Module:
    """``DistributedDataParallel(model)`` when several processes run, else ``model`` unchanged."""
    if world_size() == 1:
        return model
    if device is not None and device.type == "cuda":
        kwargs.setdefault("device_ids", [device.index if device.index is not None else local_rank()])
    return DistributedDataParallel(model, **kwargs)  # type: ignore[arg-type]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper; what checkpoints store."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model

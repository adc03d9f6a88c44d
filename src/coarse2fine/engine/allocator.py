"""The process's memory allocator for CPU training (docs/BENCHMARKS.md, "Engine overhead", folder dataset).

glibc's malloc adapts its mmap and trim thresholds as blocks are freed, so a training loop whose
activations are a few MiB each can end up returning them to the system after every step and faulting
them back in the next: 4-8x the page faults and up to 10 % of a CPU epoch in system time, depending on the
process's allocation history. Fixing both thresholds (what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do) keeps freed activation memory in the process; it measured 7-17 % faster
epochs for both the engine and a bare loop. The CLI applies it once at start; the Python API leaves the
process alone unless :func:`tune_malloc` is called.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # 32 MiB: the largest value glibc's mmap threshold accepts on 64-bit Linux
TRIM_THRESHOLD = (1 << 31) - 1  # ~2 GiB free at the heap's top before it is given back (mallopt takes an int)
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when applied.

    Does nothing (False) off Linux, without glibc, under another allocator (``LD_PRELOAD``, e.g. jemalloc)
    or when the user set any ``MALLOC_*`` threshold themselves (theirs wins).
    """
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"):
        return False
    if any(key in os.environ for key in ENV_KEYS):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (find_library runs ldconfig)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only (musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu_get_libc_version.restype = ctypes.c_char_p
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("glibc %s malloc thresholds fixed: %s", gnu_get_libc_version().decode(), ok)
    return ok

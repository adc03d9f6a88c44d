"""Progress of a loop over batches: tqdm bars on a terminal, plain lines in logs.

When stderr is a terminal, :func:`progress` gives a tqdm bar (redrawn in place with carriage returns).
Otherwise (a batch job, ``nohup``, a CI log, a pipe) it gives :class:`LogProgress`: one plain line every
``every_pct`` percent of the loop, e.g. ``train 2/10: step 40/200 (20%), loss 0.4321, acc 0.875, 1250 img/s``,
without carriage returns or escape codes. Both take the same calls: iterate, ``set_postfix``, ``close``,
``due(i)`` (whether the caller should compute a fresh postfix after step ``i``) and ``disable``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from tqdm.auto import tqdm

EVERY_PCT = 5.0  # a plain line every this many percent of the loop


class Bar(tqdm):  # type: ignore[misc]
    """tqdm's bar with ``due``: a fresh postfix every 10 steps and on the last."""

    def due(self, i: int) -> bool:
        return not self.disable and (i % 10 == 0 or (self.total is not None and i + 1 >= self.total))


class LogProgress:
    """Plain progress lines on ``stream`` every ``every_pct`` percent of ``total`` steps (and at the end)."""

    def __init__(
        self,
        iterable: Iterable[Any],
        total: int | None,
        desc: str,
        *,
        disable: bool = False,
        every_pct: float = EVERY_PCT,
        stream: IO[str] | None = None,
    ) -> None:
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.step = max(1, round((total or 0) * every_pct / 100)) if total else 50
        self.stream = stream
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._printed_at = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.n += 1
            if not self.disable and self.n % self.step == 0:
                self._line()

    def __len__(self) -> int:
        return self.total or 0

    def due(self, i: int) -> bool:
        """Step ``i`` (0-based) ends where a line is printed: the caller should ``set_postfix`` now."""
        return not self.disable and ((i + 1) % self.step == 0 or (self.total is not None and i + 1 >= self.total))

    def set_postfix(self, values: Mapping[str, Any] | None = None, **kw: Any) -> None:
        self.postfix = {**(values or {}), **kw}

    def _line(self) -> None:
        self._printed_at = self.n
        where = f"step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"step {self.n}"
        parts = [f"{self.desc}: {where}"]
        for key, value in self.postfix.items():
            parts.append(f"{value} {key}" if key.endswith("/s") else f"{key} {value}")
        if not any(k.endswith("/s") for k in self.postfix):
            parts.append(f"{time.perf_counter() - self.start:.1f} s")
        stream = self.stream or sys.stderr
        print(", ".join(parts), file=stream, flush=True)

    def close(self) -> None:
        if not self.disable and self.n and self._printed_at != self.n:
            self._line()  # the last, partial stretch (a loop stopped early or not a multiple of the step)


def progress(
    iterable: Iterable[Any],
    *,
    total: int | None,
    desc: str,
    enabled: bool,
    every_pct: float = EVERY_PCT,
    stream: IO[str] | None = None,
) -> Bar | LogProgress:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a plain line every ``every_pct`` percent;
    nothing when not ``enabled``."""
    out = stream or sys.stderr
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    if is_tty:
        return Bar(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=out)
    return LogProgress(iterable, total, desc, disable=not enabled, every_pct=every_pct, stream=stream)

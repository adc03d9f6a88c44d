"""Where a verb writes its result: checked before any work starts, so that a wrong ``--out`` fails at once
with nothing written (the files themselves are written atomically: ``engine.checkpoint.atomic_write``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from coarse2fine.engine.checkpoint import atomic_write
from coarse2fine.errors import ConfigError


def _writable_folder(folder: Path, option: str, out: Path) -> None:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"{option} {str(out)!r}: the folder {str(folder)!r} {what}; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(out)!r}: the folder {str(folder)!r} is not writable")


def checked_output_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """``path`` as a file to (over)write: its folder must exist and be writable, and it must not be a folder."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ConfigError(f"{option} {str(out)!r} is a folder; give a file name")
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"{option} {str(out)!r} exists and is not writable")
    _writable_folder(out.parent, option, out)
    return out


def checked_output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """``path`` as a folder to write into: it may be missing (it is created) when its parent exists."""
    out = Path(path).expanduser()
    if out.is_dir():
        _writable_folder(out, option, out)
    elif out.exists():
        raise ConfigError(f"{option} {str(out)!r} is a file; give a folder")
    else:
        _writable_folder(out.parent, option, out)
    return out


def _file_mode() -> int:
    """The mode a new file gets under this process's umask (``0o644`` under the usual ``022``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def make_readable(path: str | os.PathLike[str]) -> None:
    """A temporary file's private mode (``0o600``) replaced by the one a new file would get."""
    if hasattr(os, "chmod"):
        os.chmod(path, _file_mode())


def write_atomically(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None]) -> Path:
    """:func:`~coarse2fine.engine.checkpoint.atomic_write` (temporary file in the same folder, fsync, rename),
    the file readable as a new file would be (a checkpoint stays private, a result to share does not)."""

    def write(f: IO[bytes]) -> None:
        writer(f)
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), _file_mode())

    return atomic_write(path, write)

"""Finding a dataset on disk, and downloading the ones that may be downloaded (METHODS.md §4)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from coarse2fine.errors import DataError

log = logging.getLogger(__name__)


def candidate_roots(root: str | os.PathLike[str] | None, defaults: Iterable[Path]) -> list[Path]:
    """The given root first, then the default locations (duplicates removed, order kept)."""
    out: list[Path] = []
    for cand in ([Path(root).expanduser()] if root is not None else []) + [Path(d) for d in defaults]:
        if cand not in out:
            out.append(cand)
    return out


def find_root(candidates: Sequence[Path], has_files: Callable[[Path], bool]) -> Path | None:
    """The first candidate (or its named subfolder, tried by ``has_files``) holding the dataset."""
    for cand in candidates:
        if cand.is_dir() and has_files(cand):
            return cand
    return None


def download_files(
    folder: Path, mirrors: Sequence[str], resources: Sequence[tuple[str, str]], *, extract: bool = False
) -> None:
    """Download ``(filename, md5)`` resources from the first mirror that works (torchvision utilities).

    Raises DataError (with every mirror's failure) when none works, e.g. without internet.
    """
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive, download_url

    folder.mkdir(parents=True, exist_ok=True)
    for filename, md5 in resources:
        if check_integrity(str(folder / filename), md5):
            continue
        errors = []
        for mirror in mirrors:
            url = mirror + filename
            try:
                if extract:
                    download_and_extract_archive(url, str(folder), filename=filename, md5=md5)
                else:
                    download_url(url, str(folder), filename=filename, md5=md5)
                break
            except Exception as exc:  # URLError, OSError, RuntimeError (bad md5): try the next mirror
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                partial = folder / filename
                if partial.exists() and not check_integrity(str(partial), md5):
                    partial.unlink()
        else:
            raise DataError(f"download of {filename} failed: " + "; ".join(errors))
    log.info("downloaded %s into %s", ", ".join(f for f, _ in resources), folder)

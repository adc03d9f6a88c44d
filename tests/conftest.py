"""Settings every test shares."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def image_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The folder image cache (``C2F_CACHE_DIR``) of the test session lives in a temporary folder, not in
    ``~/.cache``; a test that needs its own sets the variable itself."""
    before = os.environ.get("C2F_CACHE_DIR")
    os.environ["C2F_CACHE_DIR"] = str(tmp_path_factory.mktemp("c2f-cache"))
    yield
    if before is None:
        os.environ.pop("C2F_CACHE_DIR", None)
    else:
        os.environ["C2F_CACHE_DIR"] = before

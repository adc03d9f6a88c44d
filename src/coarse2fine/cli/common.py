"""Options every verb shares: the recipe and its ``--set`` overrides, the one progress switch, and
the formatting of percentages."""

from __future__ import annotations

import argparse
from typing import Any

from coarse2fine.config import RunConfig, load_config


def add_set(p: argparse.ArgumentParser, what: str = "a recipe value, e.g. --set train.epochs=5") -> None:
    """``--set section.key=value`` (repeatable)."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} (repeatable)",
    )


def add_config(p: argparse.ArgumentParser, *, required: bool = False, default: str | None = None) -> None:
    """``--config RECIPE.yaml`` and ``--set``."""
    p.add_argument("--config", "-c", required=required, default=default, help="YAML recipe (see configs/)")
    add_set(p)


def add_quiet(p: argparse.ArgumentParser) -> None:
    """The one progress switch of every verb."""
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def checkpoint_verb(subparsers: Any, name: str, help: str, description: str, checkpoint_help: str) -> Any:
    """A verb working on a trained checkpoint: ``--checkpoint``, ``--set`` on its config and ``--quiet``."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    add_set(p, "a value of the checkpoint's config, e.g. data.root=/data")
    add_quiet(p)
    return p


def resolve_config(args: argparse.Namespace, extra: list[str] | None = None) -> RunConfig:
    """The recipe of ``--config`` with ``--set`` overrides, then ``extra`` ones (from other options)."""
    return load_config(args.config, list(args.overrides) + list(extra or []))


def pct(x: float | None, suffix: str = "%") -> str:
    """``0.9312`` -> ``93.12%`` (``n/a`` for None)."""
    return "n/a" if x is None else f"{100 * x:.2f}{suffix}"

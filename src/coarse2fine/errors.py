"""Errors a user can cause. Each message names the file, key or value at fault."""

from __future__ import annotations


class C2FError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class ConfigError(C2FError, ValueError):
    """A recipe or command-line setting is unknown or has the wrong type."""


class DataError(C2FError, ValueError):
    """A data file is missing, truncated, corrupt or inconsistent."""


class CheckpointError(C2FError, ValueError):
    """A checkpoint is unreadable, unsafe, or for another model / class list."""


class ModelError(C2FError, ValueError):
    """An unknown model name, stage name or incompatible option."""


class HierarchyError(C2FError, ValueError):
    """A category hierarchy does not match the data or is malformed."""


def describe_differences(*parts: tuple[str, list[str]]) -> str:
    """The non-empty ``(template, items)`` parts of a mismatch joined for an error message; ``{n}`` in a
    template is the count, the first three items follow (``("missing {n} key(s) e.g.", keys)``)."""
    return "; ".join(f"{template.format(n=len(items))} {items[:3]}" for template, items in parts if items)

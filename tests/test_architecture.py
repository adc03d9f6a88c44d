"""The package's shape, checked: no import of our own modules inside functions, no lazy module
``__getattr__``, short functions (docs/ARCHITECTURE.md). The layer contracts are import-linter's
(``make lint``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "coarse2fine"
MODULES = sorted(SRC.rglob("*.py"))
MAX_FUNCTION_LINES = 85  # "about 80"; a flat table may be longer, none is today


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _own_module(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "coarse2fine":
        return node.module
    if isinstance(node, ast.Import):
        return next((a.name for a in node.names if a.name.split(".")[0] == "coarse2fine"), None)
    return None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_own_modules_are_imported_at_the_top(path: Path) -> None:
    inside = [
        f"line {inner.lineno}: {_own_module(inner)}"
        for node in ast.walk(_tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
        if _own_module(inner)
    ]
    assert not inside, f"{path.name} imports the package's own modules inside functions: {inside}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_level_getattr_and_short_functions(path: Path) -> None:
    tree = _tree(path)
    assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), path
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions longer than {MAX_FUNCTION_LINES} lines: {long}"


def test_every_cli_verb_is_registered() -> None:
    from coarse2fine.cli import build_parser

    verbs = {p.stem for p in (SRC / "cli").glob("*.py")} - {"__init__", "common"}
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    # a verb module registers the command of its name (``eval`` for eval.py, ``explain`` for explain.py)
    assert verbs <= commands, verbs - commands

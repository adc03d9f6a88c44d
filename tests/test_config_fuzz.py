"""Property-based (hypothesis): any value, of any type or shape, given to any recipe key - in a recipe file
or with ``--set`` - makes ``c2f train --check`` (recipe, data, model, loss, optimizer, schedule and the run
folder's decision; nothing written) end with exit 0, or exit 2 and one ``error: ...`` line: never a
traceback, within a time bound per example and a memory bound for the whole test."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import resource
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coarse2fine.cli import main
from coarse2fine.config import RunConfig
from coarse2fine.data.idx import write_idx

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_vgg.yaml"
MAX_RSS_GROWTH = 1536 * 2**20  # bytes, over the whole test (ru_maxrss is a high-water mark)
_START_RSS: list[int] = []  # the peak before the first example


def _keys() -> dict[str, Any]:
    """Every setting as --set spells it (with its annotation), each section itself, and two unknown keys."""
    hints = typing.get_type_hints(RunConfig)
    keys: dict[str, Any] = {"bogus": Any, "train.bogus": Any}
    for f in dataclasses.fields(RunConfig):
        keys[f.name] = hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            section = typing.get_type_hints(hints[f.name])
            keys.update({f"{f.name}.{g.name}": section[g.name] for g in dataclasses.fields(hints[f.name])})
    return keys


KEYS = _keys()

# Scalars of every type YAML has: the boundaries of 64-bit integers and floats, nan / inf, unicode (right-to-left
# marks, astral planes, control characters), strings a megabyte long, texts YAML reads as other types.
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**100, -(10**300)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, 1e-3, 224.0]),
    st.text(max_size=40),
    st.builds(lambda c, n: c * n, st.characters(), st.integers(300, 200_000)),
    st.sampled_from(["", "auto", "cpu", "cuda:0", "fp16", "sgd", "cosine", "folder", "cifar100", "timm/resnet18"]),
    st.sampled_from(["..", "/", ".", "~", "\u202e", "\U0001d573", "nan", "1e-3", "0x10", "2024-01-31", "vgg61"]),
)
VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
# raw text after "key=": also what is not YAML at all, aliases, tags, flow collections left open
RAW = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["[1, 2", "{a: 1", "&a [*a]", "*undefined", "!!binary aGk=", "!!python/name:os.system", "- - -"]),
)
_INTS = st.one_of(st.integers(-3, 300), st.integers(), st.sampled_from([2**31, 2**63 - 1, 2**63, 10**30]))
_FLOATS = st.one_of(st.floats(-2.0, 2.0), st.floats(allow_nan=True, allow_infinity=True))


def _typed(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the type a setting declares, at its edges: what gets past the type check to the build."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if args and type(None) in args:
        return st.one_of(st.none(), *[_typed(a) for a in args if a is not type(None)])
    if origin is list:
        return st.lists(_typed(args[0]), max_size=4)
    if origin is dict or dataclasses.is_dataclass(tp) or tp is Any:
        names = st.sampled_from(["input_size", "dropout", "width_mult", "hidden", "init", "x"])  # real VGG keywords
        return st.dictionaries(names, _SCALARS, max_size=3)
    return {int: _INTS, float: _FLOATS, bool: st.booleans(), str: st.text(max_size=30)}.get(tp, _SCALARS)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


def _tiny_fashion_mnist(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    _tiny_fashion_mnist(root)
    _START_RSS.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return root


def _base(workspace: Path) -> dict[str, Any]:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"].update(root=str(workspace), batch_size=8)
    recipe["train"].update(device="cpu", threads=1)
    recipe["out_dir"] = str(workspace / "runs")
    return recipe


def _set_path(recipe: dict[str, Any], key: str, value: Any) -> None:
    node = recipe
    *sections, last = key.split(".")
    for s in sections:
        if not isinstance(node.get(s), dict):
            node[s] = {}
        node = node[s]
    node[last] = value


OVERRIDE = st.sampled_from(sorted(KEYS)).flatmap(
    lambda key: st.tuples(st.just(key), st.one_of(VALUES.map(_yaml), RAW, _typed(KEYS[key]).map(_yaml)))
)


@pytest.mark.slow
@settings(
    max_examples=150,
    deadline=timedelta(seconds=5),
    derandomize=True,  # the same examples in every CI run; explore with --hypothesis-seed locally
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3), in_file=st.booleans())
def test_any_value_for_any_key_exits_0_or_2_with_one_error_line(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[tuple[str, str]], in_file: bool
) -> None:
    monkeypatch.chdir(workspace)  # a relative out_dir or data.root stays in the test's folder
    recipe, args = _base(workspace), []
    for key, text in overrides:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            in_file = False  # not YAML: only --set can carry it
        else:
            _set_path(recipe, key, value)
        args.append(f"--set={key}={text}")
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True) if in_file else yaml.safe_dump(_base(workspace)))
    argv = ["train", "--config", str(path), "--check", "--quiet", *([] if in_file else args)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)  # any exception escaping main fails the example
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert len(errors) == 1, err.getvalue()[-2000:]
        assert len(errors[0]) < 5000, errors[0][:500]
    else:
        assert code == 0 and not errors and out.getvalue().startswith("ok: "), (code, err.getvalue()[-2000:])
    assert not (workspace / "runs").exists()  # --check writes nothing
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss - _START_RSS[0] < MAX_RSS_GROWTH, f"peak memory grew by {(rss - _START_RSS[0]) / 2**20:.0f} MiB"

"""The category hierarchy as data (METHODS.md §2.1 step 5): a disjoint map, overlapping partial sets, JSON.

``hierarchy.json`` (written by ``Hierarchy.save``, read by ``Hierarchy.load``)::

    {"format": "coarse2fine.hierarchy", "version": 1,
     "class_names": ["apple", "pear", "bus"],      # fine classes, in the data's order
     "coarse_of": [0, 0, 1],                        # disjoint map P^d: fine index -> coarse index
     "partial_sets": [[0, 1], [1, 2]],              # S_k: sorted fine indices, S_k contains P^d's group k
     "coarse_names": ["apple/pear", "bus"],         # optional (default: first two class names)
     "meta": {"method": "spectral", "gamma": 5.0, "u_t": 0.1, "u": [[...], [...]], ...}}  # optional

A reference taxonomy (``load_reference``) is simpler: ``{"coarse name": ["fine name", ...], ...}``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coarse2fine.errors import HierarchyError, describe_differences

FORMAT_VERSION = 1


def _where(source: str | None) -> str:
    return f"hierarchy file {source!r}" if source else "hierarchy"


def _json_safe(value: Any) -> Any:
    """Meta values as plain JSON (numpy scalars/arrays to Python, non-finite floats to None)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def default_coarse_names(
    class_names: Sequence[str], coarse_of: Sequence[int], num_coarse: int | None = None
) -> list[str]:
    """Coarse name = the first two class names of its disjoint group (``+N`` more)."""
    k = num_coarse if num_coarse is not None else (max(coarse_of) + 1 if len(coarse_of) else 0)
    names = []
    for kk in range(k):
        members = [class_names[j] for j, c in enumerate(coarse_of) if c == kk]
        name = "/".join(members[:2])
        if len(members) > 2:
            name += f"+{len(members) - 2}"
        names.append(name)
    return names


@dataclass
class Hierarchy:
    """HD-CNN's learned hierarchy.

    ``coarse_of[j]`` is the disjoint coarse category ``P^d(j)`` of fine class j; ``partial_sets[k]`` is
    the sorted fine-class list ``S_k`` (a superset of the disjoint group k); ``meta`` holds how it was
    learnt (method, gamma, u_t, the (K, C) memberships ``u``, ...).
    """

    class_names: list[str]
    coarse_of: list[int]
    partial_sets: list[list[int]]
    coarse_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.class_names = [str(n) for n in self.class_names]
        self.coarse_names = [str(n) for n in self.coarse_names]
        self.coarse_of = [int(c) if isinstance(c, np.integer) else c for c in self.coarse_of]
        self.partial_sets = [[int(j) if isinstance(j, np.integer) else j for j in s] for s in self.partial_sets]
        self.check()

    @property
    def num_coarse(self) -> int:
        return len(self.partial_sets)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- consistency --------------------------------------------------------------------------

    def check(self) -> None:
        """Internal consistency; raises :class:`HierarchyError` naming the file and the fault."""
        where = _where(self.source)
        c = len(self.class_names)
        if c == 0:
            raise HierarchyError(f"{where}: no classes")
        if len(set(self.class_names)) != c:
            dup = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
            raise HierarchyError(f"{where}: duplicate class names {dup}")
        if len(self.coarse_of) != c:
            raise HierarchyError(f"{where}: coarse_of has {len(self.coarse_of)} entries for {c} classes")
        k = len(self.partial_sets)
        if k < 1:
            raise HierarchyError(f"{where}: no coarse category")
        if len(self.coarse_names) != k:
            raise HierarchyError(f"{where}: {len(self.coarse_names)} coarse names for {k} partial sets")
        for j, cj in enumerate(self.coarse_of):
            if not isinstance(cj, int) or isinstance(cj, bool) or not 0 <= cj < k:
                raise HierarchyError(
                    f"{where}: class {self.class_names[j]!r} has coarse index {cj!r}, not in 0..{k - 1}"
                )
        for kk, s in enumerate(self.partial_sets):
            if len(s) == 0:
                raise HierarchyError(f"{where}: partial set {kk} ({self.coarse_names[kk]!r}) is empty")
            bad = [j for j in s if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < c]
            if bad:
                raise HierarchyError(
                    f"{where}: partial set {kk} holds class indices {bad} outside 0..{c - 1}"
                )
            if len(set(s)) != len(s):
                raise HierarchyError(f"{where}: partial set {kk} repeats a class")
            own = {j for j, cj in enumerate(self.coarse_of) if cj == kk}
            missing = sorted(own - set(s))
            if missing:
                names = [self.class_names[j] for j in missing]
                raise HierarchyError(f"{where}: partial set {kk} lacks its own disjoint classes {names}")

    def validate(self, class_names: Sequence[str]) -> None:
        """Check that this hierarchy is for exactly ``class_names``, in that order.

        Raises :class:`HierarchyError` naming the file and the missing / extra / reordered classes.
        """
        where = _where(self.source)
        data = [str(n) for n in class_names]
        missing = [n for n in data if n not in set(self.class_names)]
        extra = [n for n in self.class_names if n not in set(data)]
        if missing or extra:
            diff = describe_differences(("{n} data class(es) missing:", missing), ("{n} not in the data:", extra))
            raise HierarchyError(f"{where} does not match the data; {diff}")
        if data != self.class_names:
            raise HierarchyError(
                f"{where} lists the data's classes in another order; use Hierarchy.reorder()"
            )

    def reorder(self, class_names: Sequence[str]) -> Hierarchy:
        """The same hierarchy with fine classes indexed as in ``class_names`` (same set of names)."""
        data = [str(n) for n in class_names]
        if sorted(data) != sorted(self.class_names):
            self.validate(data)  # raises with the details
        pos = {n: i for i, n in enumerate(data)}
        old_to_new = [pos[n] for n in self.class_names]
        coarse_of = [0] * len(data)
        for j, cj in enumerate(self.coarse_of):
            coarse_of[old_to_new[j]] = cj
        sets = [sorted(old_to_new[j] for j in s) for s in self.partial_sets]
        meta = dict(self.meta)
        u = meta.get("u")
        if isinstance(u, list) and u and all(isinstance(r, list) and len(r) == len(data) for r in u):
            meta["u"] = [[row[self.class_names.index(n)] for n in data] for row in u]
        return Hierarchy(data, coarse_of, sets, list(self.coarse_names), meta, source=self.source)

    @classmethod
    def from_reference(
        cls, reference: dict[str, list[str]], class_names: Sequence[str], source: str | None = None
    ) -> Hierarchy:
        """A disjoint hierarchy (``S_k`` = group k) from a taxonomy ``{coarse name: [fine names]}``,
        e.g. CIFAR-100's superclasses, to train HD-CNN on a given rather than a learnt hierarchy.
        Empty reference groups are dropped; every class of ``class_names`` must be listed exactly once.
        """
        where = _where(source)
        names = [str(n) for n in class_names]
        group_of: dict[str, int] = {}
        coarse_names: list[str] = []
        for coarse, fine in reference.items():
            members = [str(n) for n in fine if str(n) in set(names)]
            if not members:
                continue
            for n in members:
                if n in group_of:
                    raise HierarchyError(f"{where}: class {n!r} is listed under two coarse categories")
                group_of[n] = len(coarse_names)
            coarse_names.append(str(coarse))
        missing = [n for n in names if n not in group_of]
        if missing:
            raise HierarchyError(f"{where}: classes of the data missing from the taxonomy: {missing}")
        coarse_of = [group_of[n] for n in names]
        sets = [[j for j, c in enumerate(coarse_of) if c == k] for k in range(len(coarse_names))]
        return cls(names, coarse_of, sets, coarse_names, {"method": "reference"}, source=source)

    # ---- views ----------------------------------------------------------------------------------

    def groups(self) -> list[list[str]]:
        """Disjoint groups, by class name, one list per coarse category."""
        out: list[list[str]] = [[] for _ in range(self.num_coarse)]
        for j, cj in enumerate(self.coarse_of):
            out[cj].append(self.class_names[j])
        return out

    def partial_groups(self) -> list[list[str]]:
        """Overlapping partial sets, by class name."""
        return [[self.class_names[j] for j in s] for s in self.partial_sets]

    def as_reference(self) -> dict[str, list[str]]:
        """``{coarse name: [fine names]}`` of the disjoint groups (the reference-taxonomy format)."""
        return dict(zip(self.coarse_names, self.groups()))

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "coarse2fine.hierarchy",
            "version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "coarse_of": [int(c) for c in self.coarse_of],
            "partial_sets": [[int(j) for j in s] for s in self.partial_sets],
            "coarse_names": list(self.coarse_names),
            "meta": _json_safe(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str | None = None) -> Hierarchy:
        where = _where(source)
        if not isinstance(d, dict):
            raise HierarchyError(f"{where}: expected a JSON object, got {type(d).__name__}")
        required = ("class_names", "coarse_of", "partial_sets")
        missing = [key for key in required if key not in d]
        if missing:
            raise HierarchyError(f"{where}: missing key(s) {missing}")
        version = d.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise HierarchyError(
                f"{where}: unsupported format version {version!r} (expected {FORMAT_VERSION})"
            )
        names, coarse_of, sets = d["class_names"], d["coarse_of"], d["partial_sets"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise HierarchyError(f"{where}: 'class_names' must be a list of strings")
        if not isinstance(coarse_of, list):
            raise HierarchyError(f"{where}: 'coarse_of' must be a list of integers")
        if not isinstance(sets, list) or not all(isinstance(s, list) for s in sets):
            raise HierarchyError(f"{where}: 'partial_sets' must be a list of lists of integers")
        coarse_names = d.get("coarse_names")
        if coarse_names is None:
            try:
                coarse_names = default_coarse_names(names, coarse_of, len(sets))
            except (TypeError, IndexError) as exc:
                raise HierarchyError(f"{where}: 'coarse_of' must be a list of integers") from exc
        if not isinstance(coarse_names, list) or not all(isinstance(n, str) for n in coarse_names):
            raise HierarchyError(f"{where}: 'coarse_names' must be a list of strings")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise HierarchyError(f"{where}: 'meta' must be an object")
        return cls(
            list(names),
            list(coarse_of),
            [list(s) for s in sets],
            list(coarse_names),
            dict(meta),
            source=source,
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, class_names: Sequence[str] | None = None) -> Hierarchy:
        """Read a JSON hierarchy; with ``class_names``, check it is for those classes (reordered to match)."""
        path = Path(path)
        src = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError as exc:
            raise HierarchyError(f"hierarchy file {src!r} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise HierarchyError(f"hierarchy file {src!r} cannot be read: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HierarchyError(f"hierarchy file {src!r} is not valid JSON: {exc}") from exc
        h = cls.from_dict(data, source=src)
        if class_names is not None:
            names = [str(n) for n in class_names]
            if sorted(names) != sorted(h.class_names):
                h.validate(names)
            if names != h.class_names:
                h = h.reorder(names)
        return h


def load_reference(path: str | Path) -> dict[str, list[str]]:
    """Read a reference taxonomy JSON: ``{coarse name: [fine names]}`` (or a saved :class:`Hierarchy`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise HierarchyError(f"reference hierarchy file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HierarchyError(f"reference hierarchy file {str(path)!r} cannot be read: {exc}") from exc
    if isinstance(data, dict) and "partial_sets" in data:
        return Hierarchy.from_dict(data, source=str(path)).as_reference()
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
    ):
        raise HierarchyError(
            f"reference hierarchy file {str(path)!r} must map coarse names to lists of fine class names"
        )
    return {str(k): list(v) for k, v in data.items()}

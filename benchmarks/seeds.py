"""Tables over seeds: the JSON files of several runs of one benchmark, one row per arm with the mean and
the spread (sample standard deviation and min-max) of each number.

    python benchmarks/seeds.py runs/herbs_s0.json runs/herbs_s1.json runs/herbs_s2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def spread(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± sd (min-max)`` of ``values`` times ``scale`` (one value: just that value)."""
    v = [scale * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    sd = statistics.stdev(v)
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def by_arm(runs: Sequence[dict[str, Any]], key: str, value: str) -> dict[str, list[float]]:
    """``row[value]`` of every run, grouped by ``row[key]``, in the order the arms first appear."""
    out: dict[str, list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            out.setdefault(str(row[key]), []).append(float(row[value]))
    return out


def paired_deltas(runs: Sequence[dict[str, Any]], key: str, value: str, base: str) -> dict[str, list[float]]:
    """Per run, ``row[value]`` minus the ``base`` arm's of the same run (a paired difference per seed)."""
    out: dict[str, list[float]] = {}
    for run in runs:
        ref = next((float(r[value]) for r in run["rows"] if r[key] == base), None)
        if ref is None:
            continue
        for row in run["rows"]:
            out.setdefault(str(row[key]), []).append(float(row[value]) - ref)
    return out


def seed_table(runs: Sequence[dict[str, Any]], *, key: str, value: str, base: str, label: str) -> str:
    """Markdown: arm | seeds | ``label`` (mean ± sd, min-max) | vs ``base`` (points, paired) | error / base's."""
    values = by_arm(runs, key, value)
    deltas = paired_deltas(runs, key, value, base)
    base_err = [1 - v for v in values.get(base, [])]
    lines = [
        f"| {key} | seeds | {label} % (mean ± sd, min-max) | vs {base} (points, per seed) | error / {base}'s |",
        "|---|---:|---|---|---:|",
    ]
    for arm, vals in values.items():
        d = deltas.get(arm)
        dtext = spread(d) if d and len(d) == len(vals) else "-"
        err = [1 - v for v in vals]
        ratio = f"{statistics.mean(err) / statistics.mean(base_err):.3f}" if base_err else "-"
        lines.append(f"| {arm} | {len(vals)} | {spread(vals)} | {dtext} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSON files with a 'rows' list")
    ap.add_argument("--key", default=None, help="the arm's name field (default: 'arm' or 'variant')")
    ap.add_argument("--value", default="top1")
    ap.add_argument("--base", default=None, help="the arm compared against (default: the first)")
    args = ap.parse_args(argv)
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    first = runs[0]["rows"][0]
    key = args.key or ("arm" if "arm" in first else "variant")
    base = args.base or str(first[key])
    print(seed_table(runs, key=key, value=args.value, base=base, label=f"test {args.value}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

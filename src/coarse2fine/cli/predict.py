"""``c2f predict``: the top classes with probabilities for image files, folders and globs.

Predicts every image named (folders recursively, globs expanded), in sorted path order. The checkpoint may be
a training checkpoint or a safetensors export (c2f export).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from coarse2fine.cli.common import checkpoint_verb
from coarse2fine.errors import ConfigError
from coarse2fine.recipes.outputs import checked_output_file
from coarse2fine.recipes.predict import (
    DEFAULT_BETA,
    FORMATS,
    PredictRequest,
    PredictResult,
    output_format,
    predict,
    save_predictions,
    write_rows,
)

HELP = "top-k classes with probabilities for image files, folders and globs"


def _beta(text: str) -> float | str | None:
    if text == DEFAULT_BETA:
        return text
    if text.lower() in ("none", "all"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number, or none to run every fine component") from None


def _print_table(result: PredictResult) -> None:
    for row in result.rows:
        print(row.path)
        for cls, prob in row.top:
            print(f"  {prob:7.2%}  {cls}")
        if row.coarse is not None:
            print(f"  coarse: {row.coarse[0]} ({row.coarse[1]:.2%}), fine components run: {row.components_run}")
        for name, (cls, prob) in (row.heads or {}).items():
            print(f"  head {name}: {cls} ({prob:.2%})")


def _print_json(result: PredictResult) -> None:
    ranked = {r.path: [{"class": c, "probability": p} for c, p in r.top] for r in result.rows}
    print(json.dumps(ranked, indent=2))


def cmd_predict(args: argparse.Namespace) -> int:
    if args.json and (args.out or args.format):
        raise ConfigError("--json prints {path: top-k} to the screen; for rows use --format jsonl (or --out x.jsonl)")
    fmt = output_format(args.out, args.format) if (args.out or args.format) else None
    if args.out:
        checked_output_file(args.out)  # a wrong --out fails before any image is read
    same = ("topk", "batch_size", "workers", "bad_images", "beta", "heads", "device", "checkpoint", "overrides")
    req = PredictRequest(inputs=args.images, progress=not args.quiet, **{name: getattr(args, name) for name in same})
    result = predict(req)
    if args.out:
        path = save_predictions(result, args.out, fmt or "csv")
        print(f"wrote {len(result.rows)} predictions to {path} ({result.images_per_second:.1f} images/s)")
    elif fmt is not None:
        write_rows(result, sys.stdout, fmt)
    elif args.json:
        _print_json(result)
    else:
        _print_table(result)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s):", file=sys.stderr)
        for path, reason in sorted(result.skipped.items()):
            print(f"  {path}: {reason.removeprefix(f'{path}: ')}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    p = checkpoint_verb(sub, "predict", HELP, __doc__, "a checkpoint, or an export folder / .safetensors file")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) and globs ('imgs/**/*.jpg')")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", help="write the rows to a file: CSV (path, class_1, probability_1, ...) or .jsonl")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="csv or jsonl (default: from --out's extension; without --out, the rows are printed in this format)",
    )
    p.add_argument("--json", action="store_true", help="print {path: [{class, probability}, ...]} as JSON")
    p.add_argument(
        "--bad-images",
        choices=("error", "skip"),
        help="unreadable images: stop with an error naming "
        "the file, or skip and list them at the end (default: the checkpoint's data.bad_images)",
    )
    p.add_argument(
        "--beta",
        type=_beta,
        default=DEFAULT_BETA,
        help="HD-CNN conditional execution: run the fine "
        "components with B_ik >= 1/(beta K); none runs all (default: the checkpoint's hdcnn.beta)",
    )
    p.add_argument(
        "--heads", action="store_true", help="add each extra head's top-1 (HERBS; HD-CNN's coarse component)"
    )
    p.add_argument("--batch-size", type=int, help="images per batch (default: the checkpoint's eval batch)")
    p.add_argument("--workers", type=int, help="image-reading processes (default: the checkpoint's data.workers)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.set_defaults(func=cmd_predict)

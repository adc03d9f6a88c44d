"""``c2f``: the command line. Each verb module parses its options, calls the recipes and prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from coarse2fine.cli import compress, demo, explain, export, hdcnn, hierarchy, models, predict, train
from coarse2fine.cli import eval as eval_
from coarse2fine.config import clip
from coarse2fine.engine.allocator import tune_malloc
from coarse2fine.errors import C2FError

VERBS = (train, eval_, predict, export, models, demo, hierarchy, compress, hdcnn, explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c2f",
        description="coarse2fine: VGG building blocks, HD-CNN and HERBS for hard-to-separate categories.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    tune_malloc()  # CPU training: freed activations stay in the process (engine/allocator.py)
    try:
        return int(args.func(args) or 0)
    except C2FError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (a name too long, no permission, ...): not a bug
        print(f"error: {clip(str(exc), 500)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

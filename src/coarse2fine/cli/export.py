"""``c2f export``: a trained model as safetensors + config.json (loadable without the training
checkpoint) or as an ONNX graph.

safetensors: the weights (compressed layers as codes + centres) and a config.json beside them (model, classes,
input size, normalisation, the run's settings, hierarchy, compression) that c2f predict / eval and
coarse2fine.recipes.load_trained read without the training checkpoint. onnx: a graph with a dynamic batch axis
whose output is the class probabilities (needs pip install coarse2fine[export]).
"""

from __future__ import annotations

import argparse
from typing import Any

from coarse2fine.cli.common import checkpoint_verb
from coarse2fine.recipes.export import FORMATS, ExportRequest, export_model

HELP = "export a trained model: safetensors + config.json, or ONNX"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def cmd_export(args: argparse.Namespace) -> int:
    result = export_model(ExportRequest(args.checkpoint, args.format, args.out, args.overrides))
    for path in result.files:
        print(f"wrote {path} ({_size(path.stat().st_size)})")
    print(f"{result.format} export: {_size(result.bytes)} in all")
    if result.max_abs_diff is not None:
        print(f"onnxruntime vs PyTorch on a test batch: max abs difference {result.max_abs_diff:.2e}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def register(sub: Any) -> None:
    p = checkpoint_verb(sub, "export", HELP, __doc__, "a training checkpoint (or an export folder)")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument(
        "--out",
        help="safetensors: a folder (or a .safetensors file, config.json beside it); onnx: a .onnx file "
        "(default: beside the checkpoint, <name>_export/ or <name>.onnx)",
    )
    p.set_defaults(func=cmd_export)

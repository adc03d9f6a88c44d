"""Batch prediction (``c2f predict``): a trained model's top classes for image files, folders and globs.

Images are found (folders recursively, globs expanded), sorted by path, read in the model's colour mode
and fed through the eval transform the model was validated with, in batches from a ``DataLoader`` with
workers (the loader of ``c2f eval``). Unreadable images follow ``bad_images`` (``error``: DataError
naming the file; ``skip``: left out and listed in ``PredictResult.skipped``). HD-CNN adds each image's
coarse category and the number of fine components run (``beta``: conditional execution, METHODS.md
§2.4); HERBS can add each head's top-1 (``heads``).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm.auto import tqdm

from coarse2fine.data import IMG_EXTENSIONS, ImageFileDataset, Skipped, scan_images
from coarse2fine.data.base import BAD_IMAGE_POLICIES
from coarse2fine.engine.evaluate import autocast, autocast_dtype, resolve_device
from coarse2fine.engine.objective import heads_of, logits_of
from coarse2fine.errors import ConfigError, DataError
from coarse2fine.hdcnn import HDCNN
from coarse2fine.hierarchy import Hierarchy
from coarse2fine.recipes.data import eval_loader
from coarse2fine.recipes.outputs import checked_output_file, write_atomically
from coarse2fine.recipes.trained import Trained, load_trained

FORMATS = ("csv", "jsonl")
DEFAULT_BETA = "default"  # PredictRequest.beta: the checkpoint's hdcnn.beta


@dataclass
class PredictRequest:
    """``c2f predict``: what to predict, with which checkpoint, and how."""

    inputs: list[str]  # image files, folders (recursive) and globs
    checkpoint: str
    topk: int = 5
    batch_size: int | None = None  # None: the checkpoint's data.eval_batch_size (or 2 x batch_size)
    workers: int | None = None  # None: the checkpoint's data.workers
    bad_images: str | None = None  # error | skip; None: the checkpoint's data.bad_images
    beta: float | str | None = DEFAULT_BETA  # HD-CNN: a number routes, None runs every component
    heads: bool = False  # each extra head's top-1 (HERBS)
    device: str | None = None  # None: the GPU when there is one
    progress: bool = True
    overrides: list[str] = field(default_factory=list)


@dataclass
class Prediction:
    """One image's result: ``top`` (class, probability) pairs, most likely first."""

    path: str
    top: list[tuple[str, float]]
    coarse: tuple[str, float] | None = None  # HD-CNN: most probable coarse category, its B_ik
    components_run: int | None = None  # HD-CNN: fine components executed for this image
    heads: dict[str, tuple[str, float]] | None = None  # head name -> (top-1 class, its probability)


@dataclass
class PredictResult:
    rows: list[Prediction]  # sorted by path
    skipped: dict[str, str]  # path -> reason (bad_images=skip)
    topk: int
    method: str
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.rows) / self.seconds if self.seconds > 0 else float("nan")


# ---- finding the images --------------------------------------------------------------------------


def _folder_images(folder: str, what: str) -> list[str]:
    files, ignored = scan_images(Path(folder), IMG_EXTENSIONS)
    if not files:
        other = f" ({ignored} file(s) without an image extension)" if ignored else ""
        raise DataError(f"{what}: no images in the folder{other}; image extensions: {', '.join(IMG_EXTENSIONS)}")
    return files


def find_images(inputs: Sequence[str]) -> list[str]:
    """Every image named by ``inputs`` (files as given, folders recursively, globs expanded; hidden files and
    files without an image extension inside folders and globs are left out), deduplicated, sorted."""
    found: set[str] = set()
    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            found.update(_folder_images(path, repr(item)))
        elif os.path.exists(path):
            found.add(path)
        elif glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataError(f"{item!r}: no file matches this pattern")
            for m in matches:
                if os.path.isdir(m):
                    found.update(_folder_images(m, repr(m)))
                elif m.lower().endswith(IMG_EXTENSIONS):
                    found.add(m)
        else:
            raise DataError(f"{item!r}: no such file or folder")
    if not found:
        raise DataError(f"no images found in {', '.join(map(repr, inputs))}")
    return sorted({os.path.normpath(p) for p in found})


class _Indexed(torch.utils.data.Dataset):
    """The images of an ImageFileDataset, each labelled with its own index (to find its path again)."""

    def __init__(self, files: ImageFileDataset) -> None:
        self.files = files
        self.classes = files.classes
        self.targets = files.targets
        self.in_memory = False
        self.source = files.source

    @property
    def skipped(self) -> dict[str, str]:
        return self.files.skipped

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        item = self.files[index]
        return item if isinstance(item, Skipped) else (item[0], index)


class _PerImage:
    """A batched (in-memory) eval transform applied to one PIL image: resized to the model's size."""

    batched = False

    def __init__(self, transform: Callable[[Tensor], Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Tensor:
        return self.transform(pil_to_tensor(image)[None])[0]


# ---- running the model ---------------------------------------------------------------------------


def _options(trained: Trained, req: PredictRequest) -> tuple[str, float | None]:
    """(bad-image policy, HD-CNN beta), checked against the model."""
    policy = req.bad_images or trained.cfg.data.bad_images
    if policy not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"--bad-images {policy!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
    if req.topk < 1:
        raise ConfigError(f"--topk {req.topk}: must be >= 1")
    is_hdcnn = isinstance(trained.model, HDCNN)
    if req.beta != DEFAULT_BETA and not is_hdcnn:
        kind = type(trained.model).__name__
        raise ConfigError(f"--beta applies to HD-CNN checkpoints; {req.checkpoint!r} holds a {kind}")
    beta = (trained.model.beta if is_hdcnn else None) if req.beta == DEFAULT_BETA else req.beta
    if beta is not None and (isinstance(beta, str) or beta <= 0):
        raise ConfigError(f"--beta {beta!r}: a positive number, or none to run every fine component")
    return policy, beta  # type: ignore[return-value]


def _loader(trained: Trained, req: PredictRequest, paths: list[str], policy: str) -> Any:
    f = trained.facts
    files = ImageFileDataset(
        paths,
        [0] * len(paths),
        ["image"],
        source="the images to predict",
        mode="L" if f.in_chans == 1 else "RGB",
        bad_images=policy,
    )
    transform = trained.eval_transform(on_device=False)  # the rows keep file order through _Indexed
    if getattr(transform, "batched", False):
        transform = _PerImage(transform)
    d = trained.cfg.data
    data = dataclasses.replace(
        d,
        decode_device="cpu",
        workers=d.workers if req.workers is None else req.workers,
        eval_batch_size=req.batch_size or d.eval_batch_size,
    )
    cfg = dataclasses.replace(trained.cfg, data=data)
    if req.device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=req.device))
    return eval_loader(cfg, _Indexed(files), transform), files


def _batch_outputs(model: Any, x: Tensor, topk: int, beta: Any, heads: bool) -> dict[str, Tensor]:
    """Top-k and the method's extras of one batch, on the CPU."""
    out = model(x, beta=beta) if isinstance(model, HDCNN) else model(x)
    probs = torch.softmax(logits_of(out).float(), dim=1)
    vals, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
    res = {"top_p": vals, "top_i": idx}
    if isinstance(model, HDCNN):
        res["coarse_p"], res["coarse_i"] = out["coarse_probs"].float().max(dim=1)
        res["run"] = out["components_run"]
    if heads:
        for name, logits in heads_of(out).items():
            res[f"head_p:{name}"], res[f"head_i:{name}"] = torch.softmax(logits.float(), dim=1).max(dim=1)
    return {k: v.cpu() for k, v in res.items()}


@torch.inference_mode()
def _run(trained: Trained, loader: Any, req: PredictRequest, beta: float | None) -> Iterator[dict[str, Tensor]]:
    device = resolve_device(req.device or trained.cfg.train.device)
    model = trained.model.to(device).eval()
    dtype = autocast_dtype("auto", device)
    bar = tqdm(loader, total=len(loader), desc="predict", disable=not req.progress, leave=False, delay=2.0)
    for images, index in bar:
        with autocast(device, dtype):
            res = _batch_outputs(model, images.to(device, non_blocking=True), req.topk, beta, req.heads)
        res["index"] = index
        yield res


def _rows(trained: Trained, paths: Any, batches: list[dict[str, Tensor]]) -> list[Prediction]:
    classes = trained.classes
    h = trained.facts.hdcnn
    coarse_names = Hierarchy.from_dict(h.hierarchy).coarse_names if h is not None else []
    rows = []
    for b in batches:
        cols = {k: v.tolist() for k, v in b.items()}
        head_names = [k.split(":", 1)[1] for k in b if k.startswith("head_p:")]
        for j, i in enumerate(cols["index"]):
            row = Prediction(paths[i], [(classes[c], p) for c, p in zip(cols["top_i"][j], cols["top_p"][j])])
            if "coarse_i" in cols:
                row.coarse = (coarse_names[cols["coarse_i"][j]], cols["coarse_p"][j])
                row.components_run = int(cols["run"][j])
            if head_names:
                row.heads = {n: (classes[cols[f"head_i:{n}"][j]], cols[f"head_p:{n}"][j]) for n in head_names}
            rows.append(row)
    return sorted(rows, key=lambda r: r.path)


def predict(req: PredictRequest, trained: Trained | None = None) -> PredictResult:
    """Predictions for every image of ``req.inputs``, sorted by path (``trained``: an already loaded model)."""
    start = time.perf_counter()
    trained = trained or load_trained(req.checkpoint, overrides=req.overrides)
    policy, beta = _options(trained, req)
    if req.heads and not (isinstance(trained.model, HDCNN) or hasattr(trained.model, "head_names")):
        raise ConfigError(f"--heads: the {trained.cfg.method} model of {req.checkpoint!r} has no extra heads")
    paths = find_images(req.inputs)
    try:
        loader, files = _loader(trained, req, paths, policy)
        batches = list(_run(trained, loader, req, beta))
    except DataError as exc:  # the dataset's hint names the recipe key; here it is an option
        raise DataError(str(exc).replace("use --set data.bad_images=skip", "use --bad-images skip")) from None
    rows = _rows(trained, files.paths, batches)
    return PredictResult(rows, dict(files.skipped), req.topk, trained.cfg.method, time.perf_counter() - start)


def predict_images(trained: Trained, paths: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    """For each file of ``paths`` (in the given order), the ``topk`` (class, probability) pairs."""
    req = PredictRequest(list(paths), str(trained.path), topk=topk, workers=0, progress=False)
    by_path = {r.path: r.top for r in predict(req, trained).rows}
    return [by_path[os.path.normpath(os.path.expanduser(p))] for p in paths]


# ---- writing the rows ----------------------------------------------------------------------------


def output_format(out: str | None, fmt: str | None) -> str:
    """``fmt`` when given, else from ``out``'s extension (``.jsonl`` / ``.ndjson``: JSON lines; else CSV)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        return fmt
    return "jsonl" if out and Path(out).suffix.lower() in (".jsonl", ".ndjson") else "csv"


def csv_header(result: PredictResult) -> list[str]:
    k = max((len(r.top) for r in result.rows), default=result.topk)
    cols = ["path"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"probability_{i}")]
    first = result.rows[0] if result.rows else None
    if first is not None and first.coarse is not None:
        cols += ["coarse", "coarse_probability", "components_run"]
    if first is not None and first.heads:
        cols += [c for name in first.heads for c in (f"head_{name}", f"head_{name}_probability")]
    return cols


def _csv_values(row: Prediction) -> list[Any]:
    values: list[Any] = [row.path] + [v for c, p in row.top for v in (c, f"{p:.6g}")]
    if row.coarse is not None:
        values += [row.coarse[0], f"{row.coarse[1]:.6g}", row.components_run]
    for c, p in (row.heads or {}).values():
        values += [c, f"{p:.6g}"]
    return values


def record(row: Prediction) -> dict[str, Any]:
    """One row as a JSON-able dict (a JSON line)."""
    rec: dict[str, Any] = {"path": row.path, "top": [{"class": c, "probability": p} for c, p in row.top]}
    if row.coarse is not None:
        rec["coarse"] = {"name": row.coarse[0], "probability": row.coarse[1]}
        rec["components_run"] = row.components_run
    if row.heads:
        rec["heads"] = {n: {"class": c, "probability": p} for n, (c, p) in row.heads.items()}
    return rec


def write_rows(result: PredictResult, stream: IO[str], fmt: str) -> None:
    """The rows as CSV (header, then one line per image) or JSON lines, to a text stream."""
    if fmt == "jsonl":
        for row in result.rows:
            stream.write(json.dumps(record(row)) + "\n")
        return
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(csv_header(result))
    for row in result.rows:
        writer.writerow(_csv_values(row))


def save_predictions(result: PredictResult, out: str | Path, fmt: str) -> Path:
    """Write the rows to ``out`` atomically (a temporary file in the same folder, then renamed)."""
    path = checked_output_file(out)

    def writer(f: IO[bytes]) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        write_rows(result, text, fmt)
        text.flush()
        text.detach()  # leave the binary file open for atomic_write's fsync

    return write_atomically(path, writer)

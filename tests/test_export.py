"""``c2f export``: safetensors + config.json loaded back by ``load_trained`` with the same outputs, ONNX run by
onnxruntime against PyTorch, and the inputs it refuses (exit 2, nothing half-written)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coarse2fine.cli import main
from coarse2fine.engine.objective import logits_of
from coarse2fine.errors import C2FError, CheckpointError
from coarse2fine.hdcnn import HDCNN, UnrolledHDCNN
from coarse2fine.herbs.fpn import _traced_pool
from coarse2fine.models import register_model, unregister_model
from coarse2fine.recipes import load_trained
from coarse2fine.recipes.export import ExportRequest, export_model
from helpers.checkpoints import CLASSES, KINDS, make_checkpoint, tiny_block
from helpers.hdcnn import TinyBlock

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs pip install coarse2fine[export]")

CASES = ["plain", "herbs", "hdcnn", "plain_pq", "hdcnn_pq"]


class KronBlock(TinyBlock):
    """A block with an operator the ONNX exporter does not know (``aten::kron``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return torch.kron(torch.ones(1, 1), y)


@pytest.fixture(scope="module", autouse=True)
def tiny_blocks() -> Iterator[None]:
    register_model("test_tiny_block", tiny_block, replace=True)
    register_model("test_kron_block", lambda num_classes, in_chans, **_: KronBlock(num_classes, in_chans), replace=True)
    yield
    unregister_model("test_tiny_block")
    unregister_model("test_kron_block")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for case in CASES:
        kind, _, pq = case.partition("_")
        out[case] = make_checkpoint(root / f"{case}.pt", kind, compressed=bool(pq))
    return out


def _input(case: str, n: int = 3) -> torch.Tensor:
    _, _, _, chans, size, _ = KINDS[case.split("_")[0]]
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(7))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, beta=None) if isinstance(model, HDCNN) else model(x)
    return logits_of(out).float()


@pytest.mark.parametrize("case", CASES)
def test_safetensors_export_loads_without_the_checkpoint(
    case: str, checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoints[case]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "kB" in printed  # the size is reported
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    original = load_trained(checkpoints[case])
    assert config["classes"] == CLASSES and config["method"] == original.cfg.method
    assert config["input"]["channels"] == original.facts.in_chans
    assert config["input"]["height"] == original.facts.image_size
    assert config["normalisation"]["mean"] == original.facts.mean
    assert config["config"]["model"]["name"] == original.cfg.model.name
    assert (config["hierarchy"] is not None) == case.startswith("hdcnn")
    assert config["compression"] == original.facts.compression
    if case.endswith("_pq"):  # the codes stay uint8 in the file
        assert any(t.dtype == torch.uint8 for t in load_file(out / "model.safetensors").values())

    x = _input(case)
    want = _logits(original.model, x)
    for source in (out, out / "model.safetensors"):
        loaded = load_trained(source)
        assert type(loaded.model) is type(original.model)
        assert loaded.classes == CLASSES and loaded.facts == original.facts
        torch.testing.assert_close(_logits(loaded.model, x), want, rtol=0, atol=1e-6)


@needs_onnx
@pytest.mark.parametrize("case", CASES)
def test_onnx_matches_pytorch_on_a_batch_of_three(case: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / f"{case}.onnx"
    result = export_model(ExportRequest(str(checkpoints[case]), "onnx", str(out)))
    assert result.files == [out] and result.bytes == out.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    trained = load_trained(checkpoints[case])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _input(case, 3)  # the export traced a batch of 2: the batch axis is dynamic
    got = session.run(None, {"input": x.numpy()})
    want = torch.softmax(_logits(trained.model, x), dim=1).numpy()
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[0].sum(1), 1.0, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["normalisation"])["std"] == trained.facts.std
    if case.startswith("hdcnn"):
        assert len(got) == 2 and got[1].shape == (3, 4)  # coarse_probs (batch, K)
        with torch.no_grad():
            coarse = trained.model(x, beta=None)["coarse_probs"].numpy()
        np.testing.assert_allclose(got[1], coarse, rtol=0, atol=1e-4)
        assert "PyTorch runtime" in meta["conditional_execution"]
        assert json.loads(meta["coarse_names"]) == ["g0", "g1", "g2", "g3"]


def test_unrolled_hdcnn_equals_probabilistic_averaging(checkpoints: dict[str, Path]) -> None:
    model = load_trained(checkpoints["hdcnn"]).model
    x = _input("hdcnn", 5)
    with torch.no_grad():
        ref = model(x, beta=None)
        probs, coarse = UnrolledHDCNN(model)(x)
    torch.testing.assert_close(probs, ref["probs"], rtol=0, atol=1e-6)
    torch.testing.assert_close(coarse, ref["coarse_probs"], rtol=0, atol=1e-6)


@needs_onnx
def test_verbs_take_an_export(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """An export converts to ONNX and to another export; its own folder cannot be the output."""
    first = tmp_path / "first"
    assert main(["export", "--checkpoint", str(checkpoints["plain"]), "--out", str(first)]) == 0
    assert main(["export", "--checkpoint", str(first), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    second = tmp_path / "second.safetensors"
    assert main(["export", "--checkpoint", str(first / "model.safetensors"), "--out", str(second)]) == 0
    assert (tmp_path / "config.json").is_file()  # beside the .safetensors file
    x = _input("plain")
    torch.testing.assert_close(_logits(load_trained(second).model, x), _logits(load_trained(first).model, x))
    assert main(["export", "--checkpoint", str(first), "--out", str(first)]) == 2


@needs_onnx
def test_export_refuses_bad_outputs_and_writes_nothing(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(checkpoints["plain"])
    missing = tmp_path / "no" / "such"
    assert main(["export", "--checkpoint", ckpt, "--out", str(missing / "m.onnx"), "--format", "onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--checkpoint", ckpt, "--out", str(missing / "folder")]) == 2
    assert "does not exist" in capsys.readouterr().err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["export", "--checkpoint", ckpt, "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@needs_onnx
def test_export_refuses_what_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "random.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(500))
    not_model = tmp_path / "dict.pt"
    torch.save({"config": {}, "classes": ["a"], "weights": torch.zeros(2)}, not_model)
    for path, words in ((junk, "checkpoint"), (not_model, "'model'"), (tmp_path / "absent.pt", "does not exist")):
        for fmt in ("safetensors", "onnx"):
            out = tmp_path / f"out_{fmt}"
            target = out.with_suffix(".onnx") if fmt == "onnx" else out
            assert main(["export", "--checkpoint", str(path), "--format", fmt, "--out", str(target)]) == 2
            err = capsys.readouterr().err
            assert words in err and str(path) in err, err
            assert not target.exists()


@needs_onnx
def test_a_model_onnx_cannot_express_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = make_checkpoint(tmp_path / "kron.pt", "tiny", overrides=["model.name=test_kron_block"])
    out = tmp_path / "kron.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported to ONNX" in err and "kron" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kron.pt"]  # nothing half-written
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "st")]) == 0  # safetensors takes it


def test_missing_onnx_names_the_extra(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(C2FError, match=r"pip install coarse2fine\[export\]"):
        export_model(ExportRequest(str(checkpoints["plain"]), "onnx", str(tmp_path / "m.onnx")))
    assert not list(tmp_path.iterdir())


def test_broken_exports_are_named(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "e"
    export_model(ExportRequest(str(checkpoints["plain"]), "safetensors", str(out)))
    weights = out / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-10])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_trained(out)
    weights.write_bytes(blob)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_trained(weights)
    # a config.json describing another export in the folder is not overwritten by a differently named one
    export_model(ExportRequest(str(checkpoints["plain"]), "safetensors", str(out)))
    with pytest.raises(CheckpointError, match="already describes"):
        export_model(ExportRequest(str(checkpoints["herbs"]), "safetensors", str(out / "other.safetensors")))


@pytest.mark.parametrize(("grid", "target"), [((7, 7), (3, 3)), ((7, 9), (2, 5)), ((6, 6), (3, 3)), ((5, 4), (1, 1))])
def test_traced_pooling_is_adaptive_average_pooling(grid: tuple[int, int], target: tuple[int, int]) -> None:
    """What HERBS' bottom-up path computes when traced for ONNX equals adaptive average pooling."""
    x = torch.randn(2, 3, grid[0] * grid[1])
    want = torch.nn.functional.adaptive_avg_pool2d(x.reshape(2, 3, *grid), target).flatten(2)
    torch.testing.assert_close(_traced_pool(x, grid, target, target[0] * target[1]), want)
    x1 = torch.randn(2, 3, 11)
    torch.testing.assert_close(_traced_pool(x1, None, None, 4), torch.nn.functional.adaptive_avg_pool1d(x1, 4))

"""Checkpoints: atomic writes, refusing pickled code, compatibility errors, RNG round trip."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coarse2fine.engine import check_compatible, load_checkpoint, save_checkpoint
from coarse2fine.engine import checkpoint as ckpt_mod
from coarse2fine.errors import CheckpointError
from helpers.engine import CLASSES, TinyNet


def state(model: torch.nn.Module, epoch: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "epoch": epoch, "classes": list(CLASSES), "history": [{"a": 1.0}]}


def test_save_failing_halfway_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    good = TinyNet()
    save_checkpoint(state(good, 1), path)

    real = ckpt_mod._torch_write

    def half_then_fail(obj: Any, f: Any) -> None:
        real(obj, f)
        f.truncate(f.tell() // 2)  # half of the new file is on disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_torch_write", half_then_fail)
    with pytest.raises(CheckpointError, match=r"last\.pt.*No space left.*unchanged"):
        save_checkpoint(state(TinyNet(), 2), path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1
    for k, v in good.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert os.listdir(path.parent) == ["last.pt"]  # no temp file left behind


def test_interrupt_during_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(state(TinyNet(), 1), path)

    def interrupted(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04" + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "_torch_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(TinyNet(), 2), path)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


class Payload:
    """Runs ``Path.touch(marker)`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": TinyNet().state_dict(), "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_truncated_and_missing_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    save_checkpoint(state(TinyNet(), 1), path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*unreadable or truncated"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match=r"nope\.pt.*does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_check_compatible_names_the_mismatch(tmp_path: Path) -> None:
    ckpt = state(TinyNet(), 1)
    check_compatible(ckpt, CLASSES, TinyNet())  # matches
    with pytest.raises(CheckpointError, match=r"ck\.pt.*4 classes, the data has 5"):
        check_compatible(ckpt, [*CLASSES, "extra"], None, path=tmp_path / "ck.pt")
    renamed = [*CLASSES[:2], "zebra", CLASSES[3]]
    with pytest.raises(CheckpointError, match=r"class 2 is 'south_west' in the checkpoint but 'zebra'"):
        check_compatible(ckpt, renamed, None)
    with pytest.raises(CheckpointError, match=r"architecture.*missing 2 key\(s\).*aux"):
        check_compatible(ckpt, CLASSES, TinyNet(heads=True))
    wide = TinyNet()
    wide.fc = torch.nn.Linear(64, 7)
    with pytest.raises(CheckpointError, match=r"'fc.weight' has shape \(4, 64\) in the checkpoint but \(7, 64\)"):
        check_compatible(ckpt, CLASSES, wide)


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    path = tmp_path / "rng.pt"
    save_checkpoint({"rng": ckpt_mod.rng_state()}, path)
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt_mod.set_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]

"""Faults of round two (docs/RELIABILITY.md): checkpoint writes that fail, output permissions, messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coarse2fine.engine import checkpoint as ckpt_mod
from coarse2fine.engine.checkpoint import load_checkpoint, save_checkpoint
from coarse2fine.errors import CheckpointError


def test_a_write_failing_the_way_torch_does_is_a_checkpoint_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def failing(obj: object, f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt_mod, "_torch_write", failing)
    expected = r"could not write .*last\.pt: \[enforce fail.*bytes free.*previous file is unchanged"
    with pytest.raises(CheckpointError, match=expected):
        save_checkpoint({"epoch": 2}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


FULL_DISK = r"""
import sys, torch
from coarse2fine.engine.checkpoint import load_checkpoint, save_checkpoint
from coarse2fine.errors import CheckpointError
path = sys.argv[1] + "/last.pt"
save_checkpoint({"epoch": 1}, path)
try:
    save_checkpoint({"epoch": 2, "big": torch.zeros(1 << 20)}, path)
except CheckpointError as exc:
    print("refused:", exc)
print("kept:", load_checkpoint(path)["epoch"])
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_a_real_full_filesystem_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    cmd = f"mount -t tmpfs -o size=256k tmpfs {mount} && {sys.executable} {script} {mount}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    if "mount" in proc.stderr and proc.returncode != 0 and "refused" not in proc.stdout:
        pytest.skip(f"cannot mount a small filesystem here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    assert "refused: could not write" in proc.stdout and "bytes free on that disk" in proc.stdout, proc.stdout
    assert "kept: 1" in proc.stdout


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"a": 1}, tmp_path / "x.pt")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert save_checkpoint({"a": 1}, tmp_path / "y.pt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_directory_given_as_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("executed",))


def test_refused_checkpoint_never_advises_weights_only_false(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, bad)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert "refused, nothing was executed" in message and "weights_only" not in message
    assert "trust the source" not in message and "executed" not in capsys.readouterr().out

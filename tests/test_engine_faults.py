"""engine.fit under real process faults: SIGKILL at a random step then resume, SIGTERM (subprocesses)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coarse2fine.engine import load_checkpoint
from helpers.engine import (
    EPOCHS,
    STEPS_PER_EPOCH,
    assert_same_weights,
    comparable,
    reference_run,
    run,
)

HELPERS = Path(__file__).parent / "helpers" / "engine.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference_run(tmp_path_factory.mktemp("reference"))


def worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(HELPERS), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


@pytest.mark.parametrize("window", [(0, STEPS_PER_EPOCH), (STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH)])
def test_sigkill_at_random_step_then_resume_matches(
    tmp_path: Path, reference: dict[str, Any], window: tuple[int, int]
) -> None:
    step = random.Random(f"sigkill{window}").randrange(*window)
    proc = worker("--run-dir", str(tmp_path), "--epochs", str(EPOCHS), "--signal-at", str(step))
    assert proc.returncode == -signal.SIGKILL, (step, proc.stderr[-2000:])
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == step // STEPS_PER_EPOCH
    model, result = run(tmp_path, epochs=EPOCHS, resume=True)
    assert_same_weights(model.state_dict(), reference["state"])
    assert comparable(result.history) == reference["history"], f"killed at batch {step}"


def test_sigterm_writes_checkpoint_and_exits_with_resume_message(tmp_path: Path, reference: dict[str, Any]) -> None:
    step = STEPS_PER_EPOCH + 3  # during epoch 2
    proc = worker("--run-dir", str(tmp_path), "--epochs", str(EPOCHS), "--signal-at", str(step), "--signal", "SIGTERM")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "SIGTERM" in proc.stderr and "resume" in proc.stderr and "Traceback" not in proc.stderr
    marker = json.loads((tmp_path / "checkpoints" / "interrupted.json").read_text())
    assert marker["signal"] == "SIGTERM" and marker["last_completed_epoch"] == 1
    assert marker["interrupted_in_epoch"] == 2
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    model, _ = run(tmp_path, epochs=EPOCHS, resume=True)
    assert not (tmp_path / "checkpoints" / "interrupted.json").exists()
    assert_same_weights(model.state_dict(), reference["state"])

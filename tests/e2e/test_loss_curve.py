"""The stored loss curve (tests/golden/loss_curve.json): the tiny flavor, fixed seed, every objective, 80 steps in
one process through the real ``mmfuse pretrain``; per-objective losses averaged over 20-step windows must stay within
the tolerance of the stored ones. Refresh after a change meant to move them: ``make loss-curve``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import losscurve

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_per_objective_losses_follow_the_stored_curve(tmp_path):
    stored = json.loads(losscurve.GOLDEN.read_text())
    assert stored["steps"] == losscurve.STEPS and stored["window"] == losscurve.WINDOW
    # Its own process: a one-rank run sets the torch.distributed environment (MASTER_PORT, ...) of its process.
    done = subprocess.run([sys.executable, "-m", "tests.losscurve", "--work", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(losscurve.__file__).parents[1], timeout=850)
    report = done.stdout.strip().splitlines()
    assert done.returncode == 0 and report[-1:] == ["the loss curve matches the stored one"], (
        "the loss curve moved (make loss-curve refreshes it when that is intended):\n" + done.stdout + done.stderr[-3000:])


def test_the_comparison_flags_a_drift_a_missing_objective_and_a_flat_loss():
    stored = {"loss/a": [4.0, 3.0, 2.0], "loss/b": [1.0, 0.9, 0.8]}
    assert losscurve.compare(stored, {"loss/a": [4.1, 3.05, 1.95], "loss/b": [1.0, 0.91, 0.79]}) == []
    problems = losscurve.compare(stored, {"loss/a": [4.0, 3.0, 2.5]})
    third = f"steps {2 * losscurve.WINDOW + 1}-{3 * losscurve.WINDOW}"
    assert any(f"loss/a: {third} mean 2.5000, stored 2.0000" in p for p in problems)
    assert "loss/b: not logged any more" in problems
    assert any("did not decrease" in p for p in losscurve.compare({"loss/a": [1.0, 1.0]}, {"loss/a": [1.0, 1.0]}))
    assert any("nan" in p for p in losscurve.compare(stored, {**stored, "loss/b": [1.0, float("nan"), 0.8]}))

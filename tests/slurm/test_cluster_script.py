"""The local cluster script: idempotent, and never overwrites a slurm.conf it did not write."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.conftest import CLUSTER, cluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def daemon_pids() -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in Path("/run/mmfuse-slurm").glob("*.pid")}


def test_start_is_idempotent(slurm_cluster):
    before = daemon_pids()
    assert "slurmctld.pid" in before and any(name.startswith("slurmd-") for name in before)
    again = cluster("start")
    assert again.returncode == 0, again.stderr
    assert daemon_pids() == before  # nothing restarted
    assert cluster("status").returncode == 0


def test_a_foreign_slurm_conf_is_left_alone(slurm_cluster, tmp_path):
    foreign = tmp_path / "slurm.conf"
    foreign.write_text("ClusterName=production\n")
    result = subprocess.run([sys.executable, str(CLUSTER), "start"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MMFUSE_SLURM_CONF": str(foreign)})
    assert result.returncode == 1 and "was not written by this script" in result.stderr
    assert foreign.read_text() == "ClusterName=production\n"

"""A real SLURM cluster for these tests: ``slurm/local_cluster/cluster.py`` (slurmctld + slurmd as root).

The session fixture starts it when it is not running (idempotent, about a second when it is). Where it cannot
start (not root, no apt) the tests that need it are skipped with the script's own message; with
``MMFUSE_REQUIRE_SLURM=1`` (CI) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfuse.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local_cluster" / "cluster.py"
TINY = ["--config", "configs/pretrain/tiny.yaml", "data.batch_size=8", "data.workers=1", "data.shuffle_window=16",
        "run.log_every=1", "optim.warmup_steps=2", "optim.lr=2e-3"]


def cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node local cluster, up. Yields its partition name."""
    result = cluster("start", "--nodes", "1")
    if result.returncode != 0:
        reason = f"local SLURM cluster could not start: {(result.stderr or result.stdout).strip()}"
        if os.environ.get("MMFUSE_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    yield "local"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """64 synthetic samples in 4 shards, sized for the tiny flavor."""
    root = tmp_path_factory.mktemp("slurm-data")
    assert cli(["synth", f"output.path={root}/raw", "num_samples=64", "image_size=64", "seed=5"]) == 0
    assert cli(["shard", f"input.path={root}/raw/manifest.parquet", f"output.path={root}/shards", "output.samples_per_shard=16",
                "image.size=64", "image.resize_mode=center_crop", "progress=false", "processes=1"]) == 0
    return root / "shards"


def submit(capsys, *args: str) -> str:
    """``mmfuse submit ...`` in this process; returns the job id it printed."""
    capsys.readouterr()
    assert cli(["submit", *args]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("submitted job "))
    return line.split()[2].rstrip(":")


def job(job_id: str) -> dict[str, str]:
    from slurm.jobs import job_info

    return job_info(job_id)[0]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logs(run_dir: Path, job_id: str) -> dict[int, str]:
    """Each task's log of a job, by rank (submitit's files in RUN/slurm/jobs)."""
    folder = Path(run_dir) / "slurm" / "jobs"
    return {int(p.name.split("_")[1]): p.read_text(errors="replace") for p in folder.glob(f"{job_id}_*_log.out")}

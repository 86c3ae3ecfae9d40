"""SIGKILL one rank under ``torchrun --max-restarts 1``: the restarted job resumes from the last committed checkpoint
and continues with the losses of the uninterrupted run (2 gloo ranks, ZeRO-2, tiny flavor, CPU fp32)."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.pretraining import command, metrics, pretrain
from mmfuse.launch import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
STEPS = ("run.steps=8", "run.checkpoint_every=3")


def rank_pid(parent: int, rank: int) -> int | None:
    for child in psutil.Process(parent).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.environ().get("RANK") == str(rank):
                return child.pid
    return None


def test_sigkill_one_rank_under_torchrun_restarts_from_the_last_commit(shards, tmp_path):  # noqa: F811
    reference = tmp_path / "reference"
    pretrain(shards, reference, *STEPS, "launch.nproc=2")

    run = tmp_path / "killed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
                "--monitor-interval", "1", "--master-port", str(free_port())]
    # launch.nproc=2 from the YAML is ignored: under torchrun each process is a rank.
    log = tmp_path / "torchrun.log"  # a file, not a pipe: nobody reads a pipe while the job runs
    with log.open("w") as stderr:
        proc = subprocess.Popen(torchrun + command(shards, run, *STEPS)[1:], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (not (run / "metrics.jsonl").exists() or len(metrics(run)) < 4):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None
        workers = psutil.Process(victim).children()  # its DataLoader workers: they must not outlive the job
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
        stderr = log.read_text()
    finally:
        if proc.poll() is None:  # a failed test must not leave a hung job behind (torchrun stops its ranks)
            proc.terminate()
            proc.wait(timeout=60)

    # Each step once: the restart dropped the first attempt's rows after the checkpoint it loaded.
    rows = metrics(run)
    resumed = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", stderr)
    assert resumed and int(resumed.group(1)) == 3  # killed after step 4: step 3 was the last commit
    assert [m["step"] for m in rows] == list(range(1, 9))
    expected = {m["step"]: m for m in metrics(reference)}
    for row in rows:
        want = expected[row["step"]]
        assert {k: v for k, v in row.items() if k.startswith(("loss", "lr"))} == \
            {k: v for k, v in want.items() if k.startswith(("loss", "lr"))}, row["step"]
        assert row["samples_seen"] == want["samples_seen"]
    assert (run / "checkpoints" / "step_000008" / "COMMITTED").is_file()
    assert workers and not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)

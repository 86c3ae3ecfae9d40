"""``mmfuse submit pretrain`` with submitit's local executor (no SLURM): 2 ranks on this machine.

submitit's local controller is the job (its pid is the job id) and the ranks are its children. At
``signal_delay_s`` before the time limit it sends them SIGUSR2; here the test sends it, as the controller would.
Rank 0 exits with submitit's requeue code and the controller starts the ranks again. SIGTERM to the controller
is passed on to the ranks: they checkpoint and the job ends, and submitting again resumes it.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO, TINY, metrics, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(180)]


def start(tiny_shards: Path, run: Path, steps: int) -> tuple[subprocess.Popen, int]:
    """``mmfuse submit ... --follow`` in its own process (it stays the controller's parent, as on a login node)."""
    proc = subprocess.Popen([sys.executable, "-m", "mmfuse.cli", "submit", "pretrain", *TINY, "--slurm",
                             "configs/slurm/local-executor.yaml", f"data.train={tiny_shards}", f"run.dir={run}",
                             f"run.steps={steps}", "run.checkpoint_every=0", "--follow"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    match = re.match(r"submitted job (\d+)", first)
    if not match:
        proc.kill()
        raise AssertionError(first + proc.communicate()[1][-3000:])
    return proc, int(match.group(1))


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


def ranks(job: int) -> list[int]:
    """The controller's children: one process per rank."""
    return [int(pid) for pid in Path(f"/proc/{job}/task/{job}/children").read_text().split()]


def job_log(run: Path, job: int, rank: int) -> str:
    return (run / "slurm" / "jobs" / f"{job}_{rank}_log.out").read_text(errors="replace")


def resumed_steps(text: str) -> list[int]:
    return [int(step) for step in re.findall(r"resumed from \S+/step_(\d+) at step", text)]


def test_checkpoint_signal_requeues_and_resumes(tiny_shards, tmp_path):
    run, steps = tmp_path / "run", 12
    proc, job = start(tiny_shards, run, steps)
    try:
        wait_for(lambda: len(metrics(run)) >= 3, 120, "3 training steps")
        pids = ranks(job)
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
    finally:
        code, out, err = finish(proc)
    rank0 = job_log(run, job, 0)
    assert code == 0, err[-3000:] + rank0[-3000:]
    assert "local job(s) finished" in err
    assert [row["step"] for row in metrics(run)] == list(range(1, steps + 1))  # each step once, none from step 0 again
    (resumed,) = resumed_steps(rank0)
    assert 3 <= resumed < steps and f"stopping at step {resumed} after a signal" in rank0
    assert f"requeueing job {job} (1 of slurm.max_requeue=3)" in rank0 and f"Requeued job {job}" in rank0
    for rank in (0, 1):  # the same job restarted: two starts of every rank, one result
        assert job_log(run, job, rank).count("Starting with JobEnvironment") == 2
        assert (run / "slurm" / "jobs" / f"{job}_{rank}_result.pkl").is_file()
    assert metrics(run)[-1]["samples_seen"] == steps * 2 * 8
    assert (run / "checkpoints" / f"step_{steps:06d}" / "COMMITTED").is_file()


def test_sigterm_to_the_job_stops_it_with_a_checkpoint_and_a_resubmission_resumes(tiny_shards, tmp_path):
    run, steps = tmp_path / "run", 8
    proc, job = start(tiny_shards, run, steps)
    try:
        wait_for(lambda: len(metrics(run)) >= 3, 120, "3 training steps")
        os.kill(job, signal.SIGTERM)
    finally:
        code, out, err = finish(proc)
    rank0 = job_log(run, job, 0)
    assert code == 1 and f"local job(s) {job} stopped before finishing" in err, err[-3000:]
    stopped = int(re.search(r"stopping at step (\d+) after a signal", rank0).group(1))
    assert "stopped by SIGTERM with a committed checkpoint; submit the same command to resume" in rank0
    assert "Requeued job" not in rank0 and not list((run / "slurm" / "jobs").glob("*_result.pkl"))
    assert 3 <= stopped < steps and (run / "checkpoints" / f"step_{stopped:06d}" / "COMMITTED").is_file()

    proc, again = start(tiny_shards, run, steps)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    assert resumed_steps(job_log(run, again, 0)) == [stopped]
    assert [row["step"] for row in metrics(run)] == list(range(1, steps + 1))

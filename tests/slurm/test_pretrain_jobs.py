"""``mmfuse submit pretrain`` on the real local cluster: 2 ranks (tiny flavor, ZeRO-2, gloo), preemption and the
time limit → checkpoint → requeue → resume, and resubmission."""

import re
import subprocess

import pytest

from slurm.jobs import wait
from tests.slurm.conftest import TINY, job, logs, metrics, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(900)]


def resumed_steps(text: str) -> list[int]:
    return [int(step) for step in re.findall(r"resumed from \S+/step_(\d+) at step", text)]


def test_requeued_job_checkpoints_resumes_and_finishes_the_same_steps(slurm_cluster, tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    steps = 20
    command = ["pretrain", *TINY, "--slurm", "configs/slurm/local.yaml", f"data.train={tiny_shards}", f"run.dir={run}",
               f"run.steps={steps}", "run.checkpoint_every=0"]
    job_id = submit(capsys, *command)

    # A second submission while the first is alive would write the same run folder: refused, nothing submitted.
    from mmfuse.cli import main as cli
    assert cli(["submit", *command]) == 1
    assert f"job {job_id} of this run folder" in capsys.readouterr().err

    wait_for(lambda: len(metrics(run)) >= 3, 300, "3 training steps")
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM to every rank, then back in the queue
    assert wait(job_id, 600) == ["COMPLETED"]
    info = job(job_id)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"

    rows = metrics(run)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))  # each step once: no restart from 0, no gap
    rank0 = logs(run, job_id)[0]
    (resumed,) = resumed_steps(rank0)
    assert 3 <= resumed < steps and "got signal 15" in rank0
    # Both ranks trained: the global sample count is 2 ranks x batch 8 per step, and each rank has its own log.
    assert rows[-1]["samples_seen"] == steps * 2 * 8
    rank1 = logs(run, job_id)[1]
    assert "global_rank=1(2)" in rank1 and "stopping at step" in rank1
    assert (run / "logs" / "rank1.log").resolve() == (run / "slurm" / "jobs" / f"{job_id}_1_log.out")
    assert (run / "checkpoints" / f"step_{steps:06d}" / "COMMITTED").is_file()

    # The run folder holds what was submitted; the sbatch script is what --dry-run prints.
    capsys.readouterr()
    from mmfuse.cli import main as cli
    assert cli(["submit", *command, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert (run / "slurm" / "jobs" / f"{job_id}_submission.sh").read_text().strip() in printed
    assert "mmfuse submit pretrain" in (run / "slurm" / "command.sh").read_text()
    assert f"steps: {steps}" in (run / "slurm" / "pretrain.yaml").read_text()

    # Submitting the same experiment again resumes it (here: at its last step, so nothing is trained twice).
    again = submit(capsys, *command)
    assert wait(again, 600) == ["COMPLETED"]
    assert resumed_steps(logs(run, again)[0]) == [steps]
    assert [row["step"] for row in metrics(run)] == list(range(1, steps + 1))


def test_time_limit_checkpoints_requeues_resumes_until_max_requeue(slurm_cluster, tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    # A 2-minute limit with the checkpoint signal due 60 s before it (SLURM looks every 30 s: it comes 30-60 s into
    # each allocation): each allocation trains a little, checkpoints and requeues itself; the second signal finds
    # max_requeue=1 used up and the job ends (FAILED, checkpoint kept) before its time limit.
    job_id = submit(capsys, "pretrain", *TINY, "--slurm", "configs/slurm/local.yaml", f"data.train={tiny_shards}",
                    f"run.dir={run}", "run.steps=100000", "run.checkpoint_every=0", "slurm.time=2",
                    "slurm.signal_delay_s=60", "slurm.max_requeue=1")
    states = wait(job_id, 600)
    info = job(job_id)
    rank0 = logs(run, job_id)[0]
    assert states == ["FAILED"], rank0[-3000:]
    assert info["Restarts"] == "1"
    assert "requeueing job" in rank0 and "requeued 1 times already (slurm.max_requeue=1)" in rank0
    committed = sorted(int(p.parent.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*/COMMITTED"))
    assert len(committed) == 2 and 1 <= committed[0] < committed[1]
    assert resumed_steps(rank0) == [committed[0]]  # the second allocation went on from the first one's checkpoint
    assert [row["step"] for row in metrics(run)] == list(range(1, committed[1] + 1))

"""Job state from the controller (``scontrol``; no accounting database needed) and following a job's log."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED"}


def job_info(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` as one dict per job (an array gives one per task); [] once SLURM forgot the job."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if result.returncode != 0:
        return []
    records = []
    for line in result.stdout.splitlines():
        record = {}
        for item in line.split():
            key, sep, value = item.partition("=")
            if sep:
                record[key] = value
        if record:
            records.append(record)
    return records


def job_states(job_id: str) -> list[str]:
    return [record.get("JobState", "UNKNOWN") for record in job_info(job_id)]


def is_active(job_id: str) -> bool:
    states = job_states(job_id)
    return any(state in ACTIVE for state in states)


def wait(job_id: str, timeout: float, poll: float = 1.0) -> list[str]:
    """Block until no task of the job is queued or running (requeues included); returns the final states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(job_id)
        if states and not any(state in ACTIVE for state in states):
            return states
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {job_states(job_id)} after {timeout:.0f} s")


def follow(job_id: str, log: Path, out: TextIO | None = None, poll: float = 1.0, done=None) -> None:
    """Print ``log`` as it grows until the job has ended (``done()``, default: SLURM says so), then the rest."""
    out = out or sys.stdout
    done = done or (lambda: not is_active(job_id))
    offset = 0
    while True:
        finished = done()
        if log.exists():
            with open(log, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            offset += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
        if finished:
            return
        time.sleep(poll)

"""The embedded distributor's process pool on the way out: an array task that exits on a signal leaves no process."""

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A pool of two sleeping workers, running (``pool``), in a child process.
POOL = """
import json, multiprocessing.forkserver, os, signal, sys, threading, time
from functools import partial

from data_pipeline.shard import distributor
from slurm.shard_array import exit_now, kill_descendants

results = distributor.run_local(partial(time.sleep), [60] * 4, 2)
threading.Thread(target=lambda: list(results), daemon=True).start()
while not distributor._pools or sum(1 for p in next(iter(distributor._pools))._pool if p.pid) < 2:
    time.sleep(0.05)
pool = next(iter(distributor._pools))
"""

# What SLURM's SIGTERM does to a task's processes (the workers and the fork server die), then the array task's exit.
SCRIPT = POOL + """
os.kill(multiprocessing.forkserver._forkserver._forkserver_pid, signal.SIGKILL)
for worker in pool._pool:
    os.kill(worker.pid, signal.SIGKILL)
time.sleep(float(sys.argv[1]))  # the pool's thread is replacing them meanwhile
exit_now(0)
"""


def marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``mark`` (zombies have none)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def leftovers(delay: float) -> list[int]:
    mark = f"MMFUSE_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), mark.split("=")[0]: mark.split("=")[1]}
    subprocess.run([sys.executable, "-c", SCRIPT, str(delay)], env=env, cwd=ROOT, timeout=120, check=True)
    time.sleep(2.0)  # anything started at the last moment has come up by now
    left = marked(mark)
    for pid in left:  # never leave them to the rest of the run
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_exit_now_leaves_no_process_while_the_pool_replaces_killed_workers(delay):
    assert leftovers(delay) == []


REPLACE = POOL + textwrap.dedent("""
    first = {worker.pid for worker in pool._pool}
    handlers = distributor.stop_starting_workers() if sys.argv[1] == "stop" else []
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    for handler in handlers:
        handler.join(30)
    deadline = time.monotonic() + (2 if handlers else 30)
    while time.monotonic() < deadline and not {w.pid for w in pool._pool if w.is_alive()} - first:
        time.sleep(0.05)
    print(json.dumps({"replaced": sorted({w.pid for w in pool._pool if w.is_alive()} - first),
                      "handler_alive": any(h.is_alive() for h in handlers)}))
    sys.stdout.flush()
    kill_descendants()
    os._exit(0)
""")


@pytest.mark.parametrize("stop", [False, True])
def test_a_stopped_pool_no_longer_replaces_killed_workers(stop):
    out = subprocess.run([sys.executable, "-c", REPLACE, "stop" if stop else "keep"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         cwd=ROOT, timeout=120, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if stop:
        assert result == {"replaced": [], "handler_alive": False}
    else:  # the pool's own behaviour, which exit_now has to stop
        assert len(result["replaced"]) == 2

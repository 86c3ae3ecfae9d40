"""A sharding job array whose tasks are preempted mid-slice, each in one of the ways SLURM ends an allocation early:
every task is requeued, skips the shards it had committed, and the dataset equals a run on one machine.

To catch each task mid-slice without sleeps, its images come from a local HTTP server that holds one chosen
image until the test has signalled the task: the task is then inside that shard with the shards before it
committed, whatever the machine's speed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_pipeline.shard.writer import shard_name
from mmfuse.cli import main as cli
from slurm.jobs import job_info, job_states, wait
from tests.slurm.conftest import REPO, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(180)]
SAMPLES, PER_SHARD, TASKS = 48, 2, 3
SHARDS = SAMPLES // PER_SHARD  # 24: 8 per array task
SLICE = SHARDS // TASKS
HELD_AT = 3  # each task is stopped inside the 4th shard of its slice, with 3 committed
SHARD = ["--config", "configs/data/shapes.yaml", f"output.samples_per_shard={PER_SHARD}", "image.size=64",
         "progress=false", "fetch.timeout=120", "fetch.retries=0"]


class Gate:
    def __init__(self):
        self.arrived, self.release = threading.Event(), threading.Event()


class HeldFiles(SimpleHTTPRequestHandler):
    """Serves the raw folder; the first request for a gated path waits until the test releases it."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        gate = self.server.gates.get(self.path.lstrip("/"))
        if gate is not None and not gate.arrived.is_set():
            gate.arrived.set()
            gate.release.wait(180)
        super().do_GET()

    def log_message(self, format: str, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a task killed mid-download breaks its pipe: expected
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The synthetic world's files over HTTP, and a manifest whose images point there."""
    root = tmp_path_factory.mktemp("requeue-data")
    assert cli(["synth", f"output.path={root}/raw", f"num_samples={SAMPLES}", "image_size=64", "seed=13"]) == 0
    raw = root / "raw"
    httpd = Server(("127.0.0.1", 0), partial(HeldFiles, directory=str(raw)))
    httpd.gates = {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    table = pq.read_table(raw / "manifest.parquet")
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pc.binary_join_element_wise(base, table["image"], ""))
    pq.write_table(table, raw / "manifest-http.parquet")  # next to the audio files its relative paths name
    yield httpd, raw / "manifest-http.parquet"
    for gate in httpd.gates.values():
        gate.release.set()
    httpd.shutdown()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> Path:
    """The same input sharded by ``mmfuse shard`` on this machine."""
    out = tmp_path_factory.mktemp("requeue-reference") / "shards"
    assert cli(["shard", *SHARD, f"input.path={server[1]}", f"output.path={out}", "processes=1"]) == 0
    return out


def assert_same_dataset(out: Path, reference: Path) -> None:
    assert not list(out.glob(".*tmp-*"))
    tars = sorted(p.name for p in reference.glob("*.tar"))
    assert len(tars) == SHARDS and sorted(p.name for p in out.glob("*.tar")) == tars
    for name in [*tars, *(t.replace(".tar", ".parquet") for t in tars), "sizes.json"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    mine, theirs = json.loads((out / "dataset.json").read_text()), json.loads((reference / "dataset.json").read_text())
    for key in ("shards", "input_rows", "written", "failed", "bytes", "modalities", "member_bytes"):
        assert mine[key] == theirs[key], key


def first_image_of(shard: int) -> str:
    return f"images/{shard * PER_SHARD:06d}.jpg"


def committed(out: Path, shards: range) -> dict[int, tuple]:
    """The shards of ``shards`` that have their stats file (the commit marker), with what would change on a rewrite."""
    found = {}
    for shard in shards:
        files = [out / f"{shard_name('shard', shard)}{suffix}" for suffix in (".tar", ".parquet", "_stats.json")]
        if files[-1].exists():
            found[shard] = tuple((p.stat().st_ino, p.stat().st_mtime_ns) for p in files)
    return found


def logged_runs(log: str) -> list[list[str]]:
    """The shards each run of a task logged as written, run by run."""
    return [re.findall(r"shard (shard-\d+): \d+ written", run) for run in log.split("Starting with JobEnvironment")[1:]]


def processes_of(folder: Path) -> list[int]:
    """Processes of the jobs with this submitit folder (tasks, their pools and forkservers), from their environment."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"\0SUBMITIT_FOLDER={folder}\0".encode() in b"\0" + environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


def describe(pids: list[int]) -> str:
    """Each process as ``pid (state, parent) command line``, for a failure message."""
    lines = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{pid} (state {stat[0]}, parent {stat[1]}) {command[:200]}")
        except OSError:
            lines.append(f"{pid} (gone)")
    return "; ".join(lines)


@pytest.mark.parametrize("processes", [1, 2])
def test_preempted_array_tasks_are_requeued_and_skip_their_finished_shards(slurm_cluster, server, reference, tmp_path,
                                                                           capsys, processes):
    """With ``processes=2`` each task maps its slice over a pool, whose workers get SLURM's signals as well."""
    httpd, manifest = server
    httpd.gates.clear()

    # Task 0 is preempted the way PreemptMode=REQUEUE and `scontrol requeue` do it (SIGTERM to every process of the
    # task); task 1 gets the time-limit signal (USR2, what submitit's checkpoint-and-requeue handler listens to);
    # task 2 the same by hand with USR1. Two CPUs: task 2 starts once one of the others has left its CPU.
    gates = {task: Gate() for task in range(TASKS)}
    httpd.gates.update({first_image_of(task * SLICE + HELD_AT): gate for task, gate in gates.items()})
    out, folder = tmp_path / "shards", tmp_path / "job"
    capsys.readouterr()
    assert cli(["submit", "shard", *SHARD, f"input.path={manifest}", f"output.path={out}", f"processes={processes}",
                "--slurm", "configs/slurm/local.yaml", "slurm.tasks_per_node=1", f"slurm.array_size={TASKS}",
                f"slurm.array_parallelism={TASKS}", f"slurm.folder={folder}"]) == 0
    job_id = re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)

    def log(task: int) -> str:
        path = folder / "jobs" / f"{job_id}_{task}_0_log.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def state(task: int) -> str:
        return next((r["JobState"] for r in job_info(f"{job_id}_{task}") if r.get("ArrayTaskId") == str(task)), "")

    how = {0: (["scontrol", "requeue", f"{job_id}_0"], "got SIGTERM"),
           1: (["scancel", "--signal=USR2", f"{job_id}_1"], "Caught signal SIGUSR2"),
           2: (["scancel", "--signal=USR1", f"{job_id}_2"], "Caught signal SIGUSR1")}
    before: dict[int, dict] = {}
    try:
        for task in range(TASKS):
            gate, slice_ = gates[task], range(task * SLICE, (task + 1) * SLICE)
            held = slice_[HELD_AT]
            wait_for(gate.arrived.is_set, 120, f"array task {task} to reach its held image")
            if processes == 1:  # mid-slice: the shards before the held one committed, the rest not begun
                assert sorted(committed(out, slice_)) == list(slice_[:HELD_AT])
            command, says = how[task]
            subprocess.run(command, check=True)
            wait_for(lambda: says in log(task), 60, f"array task {task} to see its signal")
            gate.release.set()  # the held fetch may return now: the task is already on its way out
            wait_for(lambda: state(task) != "RUNNING", 30, f"array task {task} to stop")
            before[task] = committed(out, slice_)
            assert held not in before[task] and len(before[task]) >= HELD_AT - (processes - 1)
        assert wait(job_id, 180) == ["COMPLETED"] * TASKS, [log(t)[-2000:] for t in range(TASKS)]
    finally:
        for gate in gates.values():
            gate.release.set()
        if any(s not in ("COMPLETED", "FAILED", "CANCELLED") for s in job_states(job_id)):
            subprocess.run(["scancel", job_id])

    for task in range(TASKS):
        text = log(task)
        # It left at once, not after the cluster's KillWait (60 s) with a SIGKILL.
        assert "Killed" not in text and "Force Terminated" not in text, text[-3000:]
        assert job_info(f"{job_id}_{task}")[0]["Restarts"] == "1"
        # The requeued task wrote exactly what it had not committed, and what it had was not written again.
        assert re.findall(r"(\d+) of this task's \d+ shards to write", text) == [str(SLICE), str(SLICE - len(before[task]))]
        first, second = logged_runs(text)
        slice_ = {shard_name("shard", s) for s in range(task * SLICE, (task + 1) * SLICE)}
        done = {shard_name("shard", s) for s in before[task]}
        assert sorted(second) == sorted(slice_ - done)
        assert set(first) <= done and len(first) == len(set(first))  # a pool worker's last one may go unlogged
        assert committed(out, before[task]) == before[task]
    assert_same_dataset(out, reference)
    # None left behind. A task's forkserver leaves when it sees its task's end, which on a loaded host takes a while.
    try:
        wait_for(lambda: not processes_of(folder / "jobs"), 60, "the tasks' processes to exit")
    except AssertionError as err:
        raise AssertionError(f"{err}: {describe(processes_of(folder / 'jobs'))}") from None


def test_local_executor_restarts_a_signalled_shard_task(server, reference, tmp_path):
    """submitit's local executor: USR2 reaches the task only (not its pool); submitit's requeue exit code makes the
    controller start it again, and the pool it left is not left behind."""
    httpd, manifest = server
    httpd.gates.clear()
    gate = httpd.gates[first_image_of(HELD_AT)] = Gate()
    out, folder = tmp_path / "shards", tmp_path / "job"
    proc = subprocess.Popen([sys.executable, "-m", "mmfuse.cli", "submit", "shard", *SHARD, f"input.path={manifest}",
                             f"output.path={out}", "processes=2", "--slurm", "configs/slurm/local-executor.yaml",
                             "slurm.tasks_per_node=1", f"slurm.folder={folder}", "--follow"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = int(re.match(r"submitted job (\d+)", proc.stdout.readline()).group(1))
        log = folder / "jobs" / f"{job}_0_log.out"
        wait_for(gate.arrived.is_set, 120, "the task to reach its held image")
        assert len(processes_of(folder / "jobs")) >= 3  # its pool: a forkserver and 2 workers (the task sets the
        # variable in its own memory only)
        (task,) = (int(pid) for pid in Path(f"/proc/{job}/task/{job}/children").read_text().split())
        os.kill(task, signal.SIGUSR2)
        wait_for(lambda: "Caught signal SIGUSR2" in log.read_text(), 60, "the task to see its signal")
        gate.release.set()
        out_text, err = proc.communicate(timeout=120)
    finally:
        gate.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "local job(s) finished" in err, err[-3000:]
    text = log.read_text()
    assert f"Requeued job {job}" in text and text.count("Starting with JobEnvironment") == 2
    todo = [int(n) for n in re.findall(r"(\d+) of this task's \d+ shards to write", text)]
    assert todo[0] == SHARDS and 0 < todo[1] <= SHARDS - (HELD_AT - 1)
    first, second = logged_runs(text)
    assert len(second) == todo[1] == len(set(second)) and not set(first) & set(second)
    # A pool worker may have committed a shard the stopped task never logged; the restart skipped it like the rest.
    assert len({shard_name("shard", s) for s in range(SHARDS)} - set(first) - set(second)) <= 2
    assert_same_dataset(out, reference)
    # The first run's pool went with it, though the signal reached the task only (the second run's is gone too).
    wait_for(lambda: not processes_of(folder / "jobs"), 10, "the job's processes to exit")

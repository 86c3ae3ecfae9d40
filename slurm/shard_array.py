"""``mmfuse submit shard``: the sharding stage over a job array.

The shard descriptors are planned once, at submission; array task ``i`` gets a contiguous slice and maps the same
picklable ``ShardWorker`` over it on its own cores (the embedded distributor). A shard becomes visible only when
whole and its stats file is the commit marker, so a requeued or resubmitted task skips finished shards. The task
that finds every planned shard finished (each task looks after its own last shard) writes ``sizes.json`` and then
``dataset.json``; if two finish together both write the same totals.

When an allocation ends early a task stops at once, since a shard it leaves open is simply written again:

- the checkpoint signal (SIGUSR2, ``slurm.signal_delay_s`` before the time limit or by hand; SIGUSR1 too): submitit's
  handler requeues the task (``scontrol requeue JOB_TASK``; the local executor restarts it) and the task exits;
- SIGTERM (preemption with PreemptMode=REQUEUE, ``scontrol requeue``, ``scancel``): the task exits and SLURM
  decides whether it comes back. submitit itself ignores SIGTERM, which would leave the task writing shards
  until ``KillWait`` runs out.

Either way the task first ends its worker processes, so that no shard is committed after the signal (a requeue
through ``scontrol`` takes a while, and the task's state leaves RUNNING as it starts), and then exits without
unwinding (``exit_now``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from data_pipeline.config import ShardConfig
from data_pipeline.shard.readers import ShardTask
from slurm.task import setup_logging

log = logging.getLogger("mmfuse.slurm")


def plan_array(cfg: ShardConfig, create_output: bool = True) -> tuple[list[ShardTask], list[ShardTask], str]:
    """(every planned shard, those still to write, the config fingerprint), as ``mmfuse shard`` plans them."""
    from data_pipeline.shard.readers import plan_shards
    from data_pipeline.shard.stage import pending_tasks, prepare_output
    from data_pipeline.shard.worker import config_fingerprint

    if create_output:
        prepare_output(cfg.output.path)
    fingerprint = config_fingerprint(cfg)
    tasks = plan_shards(cfg.input, cfg.output.samples_per_shard, cfg.dedup)
    return tasks, pending_tasks(cfg, tasks, fingerprint), fingerprint


def plan(cfg: ShardConfig, parts: int, create_output: bool = True) -> tuple[list, str]:
    """(one ``ShardSlice`` per array task, a one-line summary)."""
    tasks, todo, fingerprint = plan_array(cfg, create_output)
    slices, summary = split_planned(todo, len(tasks), parts, "write")
    return [ShardSlice(cfg, fingerprint, part, len(tasks)) for part in slices], summary


def split_planned(todo: list, total: int, parts: int, verb: str) -> tuple[list[list], str]:
    """(``todo`` in at most ``parts`` slices, the line that says so: "N of TOTAL shards to VERB, over ...")."""
    slices = split(todo, parts) if todo else []
    sizes = [len(part) for part in slices] or [0]
    return slices, (f"{len(todo)} of {total} shards to {verb}, over {len(slices)} array task(s) of "
                    f"{min(sizes)}-{max(sizes)} shards")


def split(tasks: list, parts: int) -> list[list]:
    """Contiguous slices of near-equal length (the first ones one longer), no empty slice."""
    parts = max(1, min(parts, len(tasks)))
    size, extra = divmod(len(tasks), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(tasks[start:end])
        start = end
    return out


class ArrayTask(submitit.helpers.Checkpointable):
    """One task of a stage's job array: its work (``_run``) with the signal handling above, logging as the one
    process of its task (its worker processes are its own). On the checkpoint signal submitit requeues it as is
    (``checkpoint()`` resubmits the same slice, and the work skips what is finished); on SIGTERM it exits and SLURM
    decides."""

    def __call__(self) -> dict[str, Any]:
        setup_logging(0)
        previous = stop_on_signals()
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(self) -> dict[str, Any]:
        raise NotImplementedError


class ShardSlice(ArrayTask):
    """Write these shards, then finalize if every planned shard is done."""

    def __init__(self, cfg: ShardConfig, fingerprint: str, tasks: list[ShardTask], total_shards: int):
        self.cfg, self.fingerprint, self.tasks, self.total_shards = cfg, fingerprint, tasks, total_shards

    def _run(self) -> dict[str, Any]:
        from data_pipeline.shard.distributor import run_local
        from data_pipeline.shard.stage import finalize, pending_tasks
        from data_pipeline.shard.worker import ShardWorker

        started = time.time()
        todo = pending_tasks(self.cfg, self.tasks, self.fingerprint)
        log.info("%d of this task's %d shards to write (shards %d-%d of %d)", len(todo), len(self.tasks),
                 self.tasks[0].shard_id, self.tasks[-1].shard_id, self.total_shards)
        written = 0
        for stats in run_local(ShardWorker(self.cfg, self.fingerprint), todo, self.cfg.processes):
            written += stats["written"]
            log.info("shard %s: %d written, %d failed", stats["shard"], stats["written"], sum(stats["failed"].values()))
        result = {"shards": len(todo), "written": written, "finalized": False}
        if all_done(self.cfg, self.total_shards):
            finalize(self.cfg, shard_ids(self.total_shards), time.time() - started)
            log.info("every shard is done: wrote sizes.json and dataset.json")
            result["finalized"] = True
        return result


def stop_on_signals() -> dict[int, Any]:
    """Install the array task's handlers (see the module docstring); returns the ones they replace."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    requeue = previous[signal.SIGUSR2]  # submitit's checkpoint-and-requeue handler, inside a submitit job

    def requeue_and_exit(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ``scontrol requeue`` SIGTERMs this very task
        halt_workers()
        try:
            requeue(signum, frame)
        except SystemExit as done:  # requeued: submitit's exit (the local executor's restart code included)
            exit_now(done.code)
        except Exception:  # not requeued (submitit logged why, e.g. timed out too often): the task ends all the same
            exit_now(1)

    def stop(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # srun forwards it too: one is enough
        halt_workers()
        log.warning("got SIGTERM (preempted, requeued or cancelled): stopped; the committed shards are kept, an "
                    "open one is written again if SLURM brings this task back")
        exit_now(0)

    if callable(requeue):
        signal.signal(signal.SIGUSR1, requeue_and_exit)
        signal.signal(signal.SIGUSR2, requeue_and_exit)
    signal.signal(signal.SIGTERM, stop)
    return previous


def exit_now(code: Any) -> None:
    """Leave without unwinding: nothing open needs saving (an open shard is written again), while unwinding would
    close the shard pool, and SLURM signals every process of the task, so a pool worker killed holding the pool's
    queue lock makes that close wait forever (until SIGKILL, ``KillWait`` later). In-flight fetches are not waited
    for either. What this task started goes with it (``halt_workers``)."""
    halt_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def halt_workers() -> None:
    """Kill what this task started: the pool, its forkserver (which a signal may have made the pool start afresh)
    and its workers, which nothing else ends (the local executor signals the task only; ``proctrack/linuxproc``
    loses track of orphans). Idempotent; from here on, no shard of this run is committed."""
    distributor = sys.modules.get("data_pipeline.shard.distributor")
    # The pool's thread would replace the workers killed below, from a new fork server if need be. Told to stop, it
    # ends when it next wakes (a worker dying wakes it), possibly after starting processes: kill until it has ended.
    handlers = distributor.stop_starting_workers() if distributor is not None else []
    deadline = time.monotonic() + 30
    while True:
        last = not any(handler.is_alive() for handler in handlers) or time.monotonic() > deadline
        kill_descendants()
        if last:
            break
        for handler in handlers:
            handler.join(0.2)


def kill_descendants() -> None:
    """SIGKILL every process below this one, stopping them first so none forks another in between."""
    import multiprocessing

    stopped: set[int] = set()
    while found := set(descendants(os.getpid())) - stopped:
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        # A stop lands asynchronously: a fork server still running may fork once more, and its child, orphaned by
        # the kill below, would be nobody's descendant any more. So the next scan waits until they all stand still.
        _wait_stopped(found)
        stopped |= found
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    for child in multiprocessing.active_children():  # where there is no /proc
        child.kill()


def _wait_stopped(pids: set[int], timeout: float = 2.0) -> None:
    """Until every process of ``pids`` is stopped or gone (``/proc/PID/stat`` state T, t, Z, X or no such file)."""
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            fields = _stat_fields(Path(f"/proc/{pid}/stat"))
            if not fields or fields[0] in "TtZX":
                waiting.discard(pid)
        if waiting:
            time.sleep(0.001)


def descendants(root: int) -> list[int]:
    """Processes below ``root``, from ``/proc/*/stat`` (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if len(fields := _stat_fields(stat)) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a ``/proc/PID/stat`` after the process name (state, parent, ...); empty once it is gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces and parentheses
    except (OSError, IndexError):
        return []


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def shard_ids(count: int) -> list[ShardTask]:
    """``finalize`` reads every shard's stats by id; descriptors without rows name them."""
    return [ShardTask(i, "", "", 0, 0) for i in range(count)]


def all_done(cfg: ShardConfig, total_shards: int) -> bool:
    from mmfuse.storage import filesystem, join
    from data_pipeline.shard.writer import shard_name

    fs, root = filesystem(cfg.output.path)
    present = {path.rsplit("/", 1)[-1] for path in fs.glob(join(root, f"{cfg.output.prefix}-*_stats.json"))}
    return all(f"{shard_name(cfg.output.prefix, i)}_stats.json" in present for i in range(total_shards))


def finish(cfg: ShardConfig) -> str:
    """Every shard written already (a resubmission after the last task died before the totals): write them."""
    from data_pipeline.shard.stage import finalize

    tasks, _, _ = plan_array(cfg, create_output=False)
    finalize(cfg, tasks, 0.0)
    return "every shard is already written; wrote sizes.json and dataset.json"

"""The embedded distributor: maps a picklable per-shard callable over shard descriptors on a local process pool.

It knows nothing about sharding; the SLURM job-array distributor maps the same callable over slices of the same
descriptors. Per-sample progress travels through two shared counters, so the progress bar moves smoothly even
with large shards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from typing import Callable, Iterable, Iterator

_counters: tuple | None = None  # (samples done, samples written), set in every worker process


def _init(counters: tuple, environ: dict | None = None) -> None:
    global _counters
    _counters = counters
    if environ is not None:
        # The fork server was started by the first pool of this process and kept that moment's environment;
        # workers take the caller's current one (e.g. AWS_ENDPOINT_URL set since).
        os.environ.clear()
        os.environ.update(environ)


def _count(success: bool) -> None:
    done, written = _counters
    with done.get_lock():
        done.value += 1
    if success:
        with written.get_lock():
            written.value += 1


def _call(worker: Callable, task) -> dict:
    worker.on_sample = _count
    return worker(task)


def run_local(worker: Callable, tasks: Iterable, processes: int, on_tick: Callable[[int, int], None] | None = None) -> Iterator[dict]:
    """Yield each task's result as it finishes. ``on_tick(done, written)`` is called about 5 times a second."""
    tasks = list(tasks)
    # forkserver: each worker forks from one server that imported the worker module once (spawn re-imports it
    # in every process; plain fork would copy the parent's threads, s3fs's event loop and the ticker, in a
    # locked state).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([type(worker).__module__])
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(counters, on_tick, stop), daemon=True) if on_tick else None
    if ticker:
        ticker.start()
    try:
        if processes == 1 or len(tasks) <= 1:
            _init(counters)
            for task in tasks:
                yield _call(worker, task)
        else:
            with ctx.Pool(min(processes, len(tasks)), initializer=_init, initargs=(counters, dict(os.environ)), maxtasksperchild=None) as pool:
                yield from pool.imap_unordered(_PoolCall(worker), tasks)
    finally:
        stop.set()
        if ticker:
            ticker.join()
            on_tick(counters[0].value, counters[1].value)


class _PoolCall:
    def __init__(self, worker: Callable):
        self.worker = worker

    def __call__(self, task) -> dict:
        return _call(self.worker, task)


def _tick(counters: tuple, on_tick: Callable[[int, int], None], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        on_tick(counters[0].value, counters[1].value)

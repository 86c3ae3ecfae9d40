"""The embedded distributor: maps a picklable per-shard callable over shard descriptors on a local process pool.

It knows nothing about sharding; the SLURM job-array distributor maps the same callable over slices of the same
descriptors. Per-sample progress travels through two shared counters, so the progress bar moves smoothly even
with large shards.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.pool
import os
import threading
import weakref
from typing import Callable, Iterable, Iterator

_counters: tuple | None = None  # (samples done, samples written), set in every worker process
_pools: weakref.WeakSet = weakref.WeakSet()  # this process's live pools, for stop_starting_workers


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
                _pools.add(pool)
                yield from pool.imap_unordered(_PoolCall(worker), tasks)
    finally:
        stop.set()
        if ticker:
            ticker.join()
            on_tick(counters[0].value, counters[1].value)


def stop_starting_workers() -> list[threading.Thread]:
    """Make every live pool of this process stop replacing dead workers; returns the pools' worker-handler threads,
    which end at their next wake-up (a worker exiting wakes them). Once they have ended, no pool here starts another
    process. For a caller about to kill its children and leave, which would otherwise race the pool's own thread:
    a worker killed by a signal is replaced at once, through a fork server started afresh if that one died too.

    Unlike ``Pool.terminate`` it takes no lock (a killed worker may hold the task queue's, and a signal handler may
    have interrupted this process holding another). It sets the handler thread's state, the condition of its loop,
    directly: CPython's ``multiprocessing.pool`` has no public call for this."""
    handlers = [pool._worker_handler for pool in list(_pools) if getattr(pool, "_worker_handler", None) is not None]
    for handler in handlers:
        handler._state = multiprocessing.pool.TERMINATE
    return handlers


class _PoolCall:
    def __init__(self, worker: Callable):
        self.worker = worker

    def __call__(self, task) -> dict:
        return _call(self.worker, task)


def _tick(counters: tuple, on_tick: Callable[[int, int], None], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        on_tick(counters[0].value, counters[1].value)

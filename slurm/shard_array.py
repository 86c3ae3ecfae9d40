"""``mmfuse submit shard``: the sharding stage over a job array.

The shard descriptors are planned once, at submission; array task ``i`` gets a contiguous slice and maps the same
picklable ``ShardWorker`` over it on its own cores (the embedded distributor). A shard becomes visible only when
whole and its stats file is the commit marker, so a requeued or resubmitted task skips finished shards. The task
that finds every planned shard finished (each task looks after its own last shard) writes ``sizes.json`` and then
``dataset.json``; if two finish together both write the same totals.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import submitit

from data_pipeline.config import ShardConfig
from data_pipeline.readers import ShardTask
from slurm.task import setup_logging

log = logging.getLogger("mmfuse.slurm")


def plan_array(cfg: ShardConfig, create_output: bool = True) -> tuple[list[ShardTask], list[ShardTask], str]:
    """(every planned shard, those still to write, the config fingerprint), as ``mmfuse shard`` plans them."""
    from data_pipeline.readers import plan_shards
    from data_pipeline.shard import pending_tasks, prepare_output
    from data_pipeline.worker import config_fingerprint

    if create_output:
        prepare_output(cfg.output.path)
    fingerprint = config_fingerprint(cfg)
    tasks = plan_shards(cfg.input, cfg.output.samples_per_shard, cfg.dedup)
    return tasks, pending_tasks(cfg, tasks, fingerprint), fingerprint


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


class ShardSlice(submitit.helpers.Checkpointable):
    """One array task: write these shards, then finalize if every planned shard is done. On the preemption
    signal submitit requeues it as is (``checkpoint()`` resubmits the same slice; finished shards are skipped)."""

    def __init__(self, cfg: ShardConfig, fingerprint: str, tasks: list[ShardTask], total_shards: int):
        self.cfg, self.fingerprint, self.tasks, self.total_shards = cfg, fingerprint, tasks, total_shards

    def __call__(self) -> dict[str, Any]:
        from data_pipeline.distributor import run_local
        from data_pipeline.shard import finalize, pending_tasks
        from data_pipeline.worker import ShardWorker

        setup_logging(0)  # one process per array task (its shard workers are its own)
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


def shard_ids(count: int) -> list[ShardTask]:
    """``finalize`` reads every shard's stats by id; descriptors without rows name them."""
    return [ShardTask(i, "", "", 0, 0) for i in range(count)]


def all_done(cfg: ShardConfig, total_shards: int) -> bool:
    from data_pipeline.storage import filesystem, join
    from data_pipeline.writer import shard_name

    fs, root = filesystem(cfg.output.path)
    present = {path.rsplit("/", 1)[-1] for path in fs.glob(join(root, f"{cfg.output.prefix}-*_stats.json"))}
    return all(f"{shard_name(cfg.output.prefix, i)}_stats.json" in present for i in range(total_shards))


def finalize_all(cfg: ShardConfig) -> None:
    """Every shard written already (a resubmission after the last task died before the totals): write them."""
    from data_pipeline.shard import finalize

    tasks, _, _ = plan_array(cfg, create_output=False)
    finalize(cfg, tasks, 0.0)

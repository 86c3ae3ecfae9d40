"""``mmfuse submit curate``: the curation stage over a job array.

The scans are planned once, at submission (one per input shard; those already written are left out, and the scan
settings are bound then); array task ``i`` scans a contiguous slice with its own ``processes``. A scan becomes
visible only when whole, so a requeued task rescans only what it had not finished. The task that finds every
shard's scan written decides: the index, the report and ``output.shards`` come from the scans alone, so two tasks
finishing together write the same files. Signals are handled as for sharding (slurm/shard_array.py): an open scan
is simply made again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from data_pipeline.curate.config import CurateConfig
from data_pipeline.curate.scan import ScanTask, scanned
from slurm.shard_array import ArrayTask, split_planned

log = logging.getLogger("mmfuse.slurm")


def plan(cfg: CurateConfig, parts: int, create_output: bool = True) -> tuple[list, str]:
    """(one ``CurateSlice`` per array task, a one-line summary). Without ``create_output`` (a dry run) nothing is
    written, so the scan settings stay unbound."""
    from data_pipeline.curate.stage import plan_scans

    tasks, todo = plan_scans(cfg, bind=create_output)
    slices, summary = split_planned(todo, len(tasks), parts, "scan")
    return [CurateSlice(cfg, part, tasks) for part in slices], summary


def finish(cfg: CurateConfig) -> str:
    """Every shard scanned already (a resubmission, or changed rules on the same scans): decide here, at once."""
    from data_pipeline.curate.stage import conclude, plan_scans

    tasks, _ = plan_scans(cfg)
    conclude(cfg, tasks)
    return "every shard is already scanned; decided from the scans: index.parquet, curate.json and REPORT.md"


class CurateSlice(ArrayTask):
    """Scan these shards (``mine``), then decide if every shard's scan (``every``) is written."""

    def __init__(self, cfg: CurateConfig, mine: list[ScanTask], every: list[ScanTask]):
        self.cfg, self.mine, self.every = cfg, mine, every

    def _run(self) -> dict[str, Any]:
        from data_pipeline.curate.stage import conclude, scan

        started = time.time()
        todo = [task for task in self.mine if not scanned(task)]
        log.info("%d of this task's %d shards to scan", len(todo), len(self.mine))
        scan(self.cfg, todo)
        result = {"shards": len(todo), "decided": False}
        if all(scanned(task) for task in self.every):
            summary = conclude(self.cfg, self.every)
            log.info("every shard is scanned: decided %d of %d samples kept (%.0f s)", summary["kept"],
                     summary["samples"], time.time() - started)
            result["decided"] = True
        return result

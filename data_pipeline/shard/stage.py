"""``mmfuse shard``: raw pairs → WebDataset shards, per-shard parquet + stats, then sizes.json and dataset.json.

    mmfuse shard input.path=manifest.parquet output.path=s3://bucket/ds [key=value ...]

Reader → per-shard worker → writer, mapped over shard descriptors by a distributor. A rerun skips shards whose
stats file exists and redoes the rest; ``retry_failed=true`` also redoes the failed samples of finished shards.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from data_pipeline.config import ShardConfig
from data_pipeline.shard.distributor import run_local
from data_pipeline.shard.readers import ShardTask, plan_shards
from mmfuse.storage import filesystem, is_local, join, write_bytes
from mmfuse.redact import redact
from data_pipeline.shard.worker import ShardWorker, config_fingerprint
from data_pipeline.shard.writer import shard_name
from mmfuse.config import parse_args, to_dict
from mmfuse.logs import setup_logging
from mmfuse.progress import progress

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


def pending_tasks(cfg: ShardConfig, tasks: list[ShardTask], fingerprint: str) -> list[ShardTask]:
    """Shards still to write: those without a stats file (plus, when retrying, those with failures)."""
    fs, root = filesystem(cfg.output.path)
    finished = {}
    for path in fs.glob(join(root, f"{cfg.output.prefix}-*_stats.json")):
        stats = json.loads(fs.cat_file(path))
        if stats.get("config_fingerprint") != fingerprint:
            raise ValueError(
                f"{redact(cfg.output.path)} already holds shards written with other settings ({path.rsplit('/', 1)[-1]}); "
                "use a new output.path, or rerun with the settings that wrote them"
            )
        finished[stats["shard"]] = stats
    todo = []
    for task in tasks:
        stats = finished.get(shard_name(cfg.output.prefix, task.shard_id))
        retryable = stats and cfg.retry_failed and any(reason != "duplicate" for reason in stats["failed"])
        if stats is None or retryable:
            todo.append(task)
    return todo


def prepare_output(url: str) -> None:
    """Create a local output folder; on an object store check the bucket exists (never create one: a typo in a
    bucket name must not make a new bucket)."""
    fs, root = filesystem(url)
    if is_local(url):
        fs.makedirs(root, exist_ok=True)
        return
    bucket = root.split("/", 1)[0]
    if not fs.exists(bucket):
        raise ValueError(f"output.path {redact(url)!r}: bucket {bucket!r} does not exist (or is not visible with these credentials)")


def run(cfg: ShardConfig) -> dict:
    """Shard the input; returns the dataset summary (also written as dataset.json)."""
    started = time.time()
    preflight(cfg)
    prepare_output(cfg.output.path)
    fingerprint = config_fingerprint(cfg)
    tasks = plan_shards(cfg.input, cfg.output.samples_per_shard, cfg.dedup)
    todo = pending_tasks(cfg, tasks, fingerprint)
    total_rows = sum(t.row_end - t.row_start for t in todo)
    log.info("%d shards planned, %d to write (%d rows)", len(tasks), len(todo), total_rows)

    bar = progress(total_rows, "shard", "sample", disable=not cfg.progress)

    def on_tick(done: int, written: int) -> None:
        if done != bar.n:
            bar.set_postfix_str(f"ok {written / done:.1%}", refresh=False)
            bar.update(done - bar.n)

    worker = ShardWorker(cfg, fingerprint)
    for _ in run_local(worker, todo, cfg.processes, on_tick if cfg.progress else None):
        pass
    bar.close()
    summary = finalize(cfg, tasks, time.time() - started)
    print(format_summary(summary), file=sys.stderr)
    if summary["input_rows"] and not summary["written"]:
        reasons = ", ".join(f"{reason}={count}" for reason, count in summary["failed"].items())
        raise ValueError(f"no sample was written: all {summary['input_rows']} input rows failed ({reasons}); the first "
                         f"inputs: {', '.join(repr(redact(path)) for path in example_inputs(cfg, tasks))}")
    return summary


def preflight(cfg: ShardConfig) -> None:
    """Before any worker process or array job starts: credentials for object-store URLs, a writable output (the
    input's existence and format are checked when the shards are planned, also before any worker)."""
    from data_pipeline.preflight import check_credentials, check_output

    check_credentials("input.path", cfg.input.path)
    check_output("output.path", cfg.output.path)


def example_inputs(cfg: ShardConfig, tasks: list[ShardTask], count: int = 3) -> list[str]:
    """The media locations of the first input rows, for an error message."""
    from data_pipeline.shard.readers import load_rows

    rows = load_rows(tasks[0].source, tasks[0].format, cfg.input)[:count] if tasks else ()
    return [path for row in rows for path in (row.image, row.audio) if path][:count]


def finalize(cfg: ShardConfig, tasks: list[ShardTask], seconds: float) -> dict:
    """Write sizes.json, then dataset.json last; only when every planned shard has its stats file."""
    fs, root = filesystem(cfg.output.path)
    stats = []
    for task in tasks:
        path = join(root, f"{shard_name(cfg.output.prefix, task.shard_id)}_stats.json")
        if not fs.exists(path):
            raise RuntimeError(f"shard {task.shard_id} has no stats file after the run; rerun to finish it")
        stats.append(json.loads(fs.cat_file(path)))
    summary = {**totals(stats), "seconds_this_run": round(seconds, 2), "config": _public_config(cfg)}
    publish(cfg.output.path, {f"{s['shard']}.tar": s["written"] for s in stats}, summary)
    return summary


def totals(stats: list[dict]) -> dict:
    """dataset.json's counts over the shards' stats files."""
    failed: Counter[str] = Counter()
    cleaned: Counter[str] = Counter()
    members: Counter[str] = Counter()
    for s in stats:
        failed.update(s["failed"])
        cleaned.update(s.get("cleaned", {}))
        members.update(s["bytes"]["members"])
    return {
        "schema_version": SCHEMA_VERSION,
        "shards": len(stats),
        "input_rows": sum(s["input_rows"] for s in stats),
        "written": sum(s["written"] for s in stats),
        "failed": dict(sorted(failed.items())),
        "cleaned": dict(sorted(cleaned.items())),
        "bytes": sum(s["bytes"]["tar"] for s in stats),
        "modalities": sorted({"image" if ext in ("jpg", "webp", "png") else {"txt": "text", "flac": "audio"}.get(ext, "") for ext in members} - {""}),
        "member_bytes": dict(sorted(members.items())),
        "shard_seconds": round(sum(s["seconds"] for s in stats), 2),
    }


def publish(url: str, sizes: dict[str, int], summary: dict) -> None:
    """sizes.json, then dataset.json: the two files that make a folder of shards a finished dataset."""
    fs, root = filesystem(url)
    if is_local(url):  # leftovers of a run killed while it finalized
        for pattern in (".sizes.json.tmp-*", ".dataset.json.tmp-*"):
            for stale in Path(root).glob(pattern):
                stale.unlink()
    write_bytes(fs, join(root, "sizes.json"), json.dumps(sizes, indent=1).encode())
    write_bytes(fs, join(root, "dataset.json"), json.dumps(summary, indent=1, sort_keys=True).encode())


def _public_config(cfg: ShardConfig) -> dict:
    """The resolved config as saved: URLs without credentials or signed query strings."""
    values = to_dict(cfg)
    values["input"]["path"] = redact(values["input"]["path"])
    values["output"]["path"] = redact(values["output"]["path"])
    return values


def format_summary(summary: dict) -> str:
    rows = [("written", summary["written"])] + [(f"  cleaned: {r}", n) for r, n in summary.get("cleaned", {}).items()]
    rows += [(f"failed: {r}", n) for r, n in summary["failed"].items()]
    total = summary["input_rows"] or 1
    width = max(len("input rows"), *(len(name) for name, _ in rows))
    lines = [f"{'status':<{width}}  {'samples':>9}  {'share':>7}", "-" * (width + 20)]
    lines += [f"{name:<{width}}  {n:>9}  {n / total:>7.2%}" for name, n in rows]
    lines.append(f"{'input rows':<{width}}  {summary['input_rows']:>9}")
    lines.append(f"{summary['shards']} shards, {summary['bytes'] / 1e6:.1f} MB, modalities: {', '.join(summary['modalities'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    cfg = parse_args(ShardConfig, argv, prog="mmfuse shard", description=__doc__.split("\n\n")[0])
    return run(cfg)


if __name__ == "__main__":
    main()

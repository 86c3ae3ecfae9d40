"""``output.shards``: the kept samples written as a dataset of their own, for tools that read plain WebDataset shards
(no ``data.keep``). Each original shard with a kept sample becomes a shard of the same name holding those samples,
every member copied byte for byte, in order, with the shard's parquet and stats file as ``mmfuse shard`` writes them;
sizes.json and dataset.json come last, when every shard is there, so a half-written folder is never taken for a
dataset. A rerun rewrites the folder from the current index: shards left without a kept sample are removed."""

from __future__ import annotations

import posixpath
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from data_pipeline.config import OutputConfig
from data_pipeline.loader.sources import ShardInfo
from data_pipeline.loader.tarstream import ShardError, iter_samples
from mmfuse.redact import redact
from mmfuse.storage import filesystem, join

MAX_MEMBER_BYTES = 1 << 31  # copied as they are: the sharding stage and the loader judge sizes, not the copy


@dataclass(frozen=True)
class CopyTask:
    shard: ShardInfo
    positions: tuple[int, ...]
    """The kept samples' positions in the original tar, ascending."""


class CopyWorker:
    """Writes one shard's kept samples (the distributor's per-task callable; ``on_sample`` is set by it)."""

    def __init__(self, out: str, index: str):
        self.out, self.index = out, index
        self.on_sample = None

    def __call__(self, task: CopyTask) -> dict:
        from data_pipeline.shard.writer import ShardWriter

        started = time.time()
        name = posixpath.basename(task.shard.url).removesuffix(".tar")
        writer = ShardWriter(OutputConfig(path=self.out), 0, name=name)
        members: Counter[str] = Counter()
        try:
            for raw in iter_samples(task.shard.url, None, MAX_MEMBER_BYTES, positions=task.positions):
                writer.write({"__key__": raw.key, **raw.members})
                writer.record({"key": raw.key, "status": "success"})
                members.update({ext: len(data) for ext, data in raw.members.items()})
                if self.on_sample:
                    self.on_sample(True)
            if writer.written != len(task.positions):
                raise ShardError("shard_changed", f"{redact(task.shard.url)} holds fewer samples than the index says")
            return writer.close({"shard": name, "input_rows": task.shard.count, "written": writer.written,
                                 "failed": {}, "cleaned": {}, "bytes": {"members": dict(sorted(members.items()))},
                                 "seconds": round(time.time() - started, 3), "source": redact(task.shard.url),
                                 "curated_by": redact(self.index)})
        except BaseException:
            writer.abort()
            raise


def write_kept(index: pa.Table, shards: tuple[ShardInfo, ...], out: str, index_url: str, processes: int) -> dict:
    """The kept samples of ``index`` as shards under ``out``; returns dataset.json's summary."""
    from data_pipeline.shard.distributor import run_local
    from data_pipeline.shard.stage import publish, totals

    kept: dict[str, list[int]] = {}
    for name, position, keep in zip(index["shard"].to_pylist(), index["position"].to_pylist(), index["kept"].to_pylist()):
        if keep:
            kept.setdefault(name, []).append(position)
    tasks = [CopyTask(shard, tuple(sorted(kept[name]))) for shard in shards
             if (name := posixpath.basename(shard.url)) in kept]
    fs, root = filesystem(out)
    fs.makedirs(root, exist_ok=True)
    for finished in ("dataset.json", "sizes.json"):  # not a finished dataset while it is being rewritten
        if fs.exists(join(root, finished)):
            fs.rm(join(root, finished))
    for name in {posixpath.basename(shard.url) for shard in shards} - set(kept):  # kept by an earlier run, not now
        for stale in (name, name.removesuffix(".tar") + ".parquet", name.removesuffix(".tar") + "_stats.json"):
            if fs.exists(join(root, stale)):
                fs.rm(join(root, stale))
    stats = list(run_local(CopyWorker(out, index_url), tasks, processes))
    stats.sort(key=lambda s: s["shard"])
    summary = {**totals(stats), "curated_by": redact(index_url)}
    publish(out, {f"{s['shard']}.tar": s["written"] for s in stats}, summary)
    return summary

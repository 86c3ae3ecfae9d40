"""Where the loader's samples come from: datasets resolved into shard URLs with sample counts.

A dataset is a folder or object-store prefix with ``sizes.json`` (made by ``mmfuse shard``), a folder of ``.tar`` files without one (img2dataset's output as it is), a brace pattern
(``s3://b/shard-{000000..000099}.tar``) or a single ``.tar``. Counts come from ``sizes.json``, else from each
shard's ``_stats.json`` (img2dataset's ``successes``); a shard neither lists has its tar headers read once.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import braceexpand

from mmfuse.storage import filesystem

from mmfuse.redact import redact
from data_pipeline.loader.tarstream import count_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int
    keep: tuple[int, ...] | None = None
    """With a curated subset (``data.keep``): the positions in the tar of the ``count`` samples to read."""


@dataclass(frozen=True)
class Source:
    name: str
    shards: tuple[ShardInfo, ...]
    weight: float

    @property
    def samples(self) -> int:
        return sum(s.count for s in self.shards)


def dataset_names(spec: str) -> list[str]:
    """``a::b::c`` → the datasets it names."""
    names = [part.strip() for part in spec.split("::") if part.strip()]
    if not names:
        raise ValueError("no dataset given (train is empty)")
    return names


def resolve_sources(spec: str, weights: list[float] | None = None, keep: str = "") -> list[Source]:
    """``a::b::c`` → one Source per dataset; weights default to dataset sizes. ``keep``: a subset index
    (``mmfuse curate``) naming which samples of the (single) dataset to read."""
    names = dataset_names(spec)
    if keep and len(names) > 1:
        raise ValueError(f"data.keep applies to one dataset; data.train names {len(names)} (curate them as one "
                         "dataset, or reshard each curated subset and mix those)")
    sources = []
    for i, name in enumerate(names):
        shards = tuple(ShardInfo(url, count if count is not None else _count(url)) for url, count in shard_listing(name))
        if not shards:
            raise ValueError(f"dataset {redact(name)!r} has no shards")
        if keep:
            shards = kept_shards(shards, keep, name)
        samples = sum(s.count for s in shards)
        weight = float(weights[i]) if weights else float(samples)
        sources.append(Source(name, shards, weight))
    return sources


def shard_listing(name: str) -> list[tuple[str, int | None]]:
    """One dataset's shard URLs with their sample counts from ``sizes.json`` (None where it has no entry), reading
    no tar: what the launcher can check in a second before any rank starts."""
    if name.endswith(".tar") or "{" in name:
        urls = list(braceexpand.braceexpand(name))
        sizes = _sizes_beside(urls[0])
        return [(url, _listed(url, sizes)) for url in urls]
    fs, root = filesystem(name)
    base = name.rstrip("/")
    sizes_path = posixpath.join(root, "sizes.json")
    if fs.exists(sizes_path):
        sizes = json.loads(fs.cat_file(sizes_path))
        return [(f"{base}/{shard}", int(count)) for shard, count in sorted(sizes.items())]
    counts = stats_counts(fs, root)
    if not counts:
        raise ValueError(f"{redact(name)!r} is neither a .tar, a brace pattern, nor a folder of shards (sizes.json, or "
                         ".tar files as img2dataset writes them)")
    return [(f"{base}/{shard}", count) for shard, count in counts.items()]


def stats_counts(fs, root: str) -> dict[str, int | None]:
    """A folder without sizes.json (img2dataset's output as it is): its .tar files, each with the samples its
    ``NNNNN_stats.json`` says it holds (img2dataset's ``successes``), None where there is none. The
    stats files are fetched in one concurrent batch: a 10,000-shard prefix is listed in seconds. A folder of our own
    shards without sizes.json is a sharding run that has not finished: an error, not a dataset."""
    tars = sorted(posixpath.basename(path) for path in fs.glob(posixpath.join(root, "*.tar")))
    stats_paths = {tar: posixpath.join(root, tar.removesuffix(".tar") + "_stats.json") for tar in tars}
    found = fs.cat(list(stats_paths.values()), on_error="omit") if tars else {}
    found = {posixpath.basename(path.rstrip("/")): data for path, data in found.items()}
    counts: dict[str, int | None] = {}
    for tar, path in stats_paths.items():
        try:
            stats = json.loads(found[posixpath.basename(path)])
        except (KeyError, ValueError):
            counts[tar] = None
            continue
        if isinstance(stats, dict) and "written" in stats and "successes" not in stats:
            raise ValueError(f"{redact(root)!r} holds mmfuse shards but no sizes.json: the sharding run did not finish "
                             "(run the same mmfuse shard command again to finish it)")
        try:
            counts[tar] = int(stats["successes"])
        except (KeyError, ValueError, TypeError):
            counts[tar] = None
    return counts


def _sizes_beside(url: str) -> dict[str, int]:
    fs, path = filesystem(url)
    sizes_path = posixpath.join(posixpath.dirname(path), "sizes.json")
    try:
        return json.loads(fs.cat_file(sizes_path)) if fs.exists(sizes_path) else {}
    except (OSError, ValueError):
        return {}


def _listed(url: str, sizes: dict[str, int]) -> int | None:
    name = url.rsplit("/", 1)[-1]
    return int(sizes[name]) if name in sizes else None


def _count(url: str) -> int:
    log.info("no sizes.json entry for %s: counting its samples from the tar headers", redact(url))
    return count_samples(url)


def kept_positions(index: str) -> dict[str, tuple[int, ...]]:
    """A subset index (``mmfuse curate``'s ``index.parquet``, or the folder holding it) → {shard file name: the
    ascending positions of its kept samples}."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, path = filesystem(index)
    if fs.isdir(path):
        path = posixpath.join(path, "index.parquet")
    if not fs.exists(path):
        raise ValueError(f"data.keep={redact(index)!r}: no subset index there (mmfuse curate writes OUT/index.parquet)")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["shard", "position", "kept"])
    table = table.filter(pc.field("kept")).sort_by([("shard", "ascending"), ("position", "ascending")])
    positions: dict[str, list[int]] = {}
    for shard, position in zip(table["shard"].to_pylist(), table["position"].to_pylist()):
        positions.setdefault(shard, []).append(position)
    return {shard: tuple(kept) for shard, kept in positions.items()}


def kept_shards(shards: tuple[ShardInfo, ...], index: str, name: str) -> tuple[ShardInfo, ...]:
    """``shards`` cut to the samples the subset index keeps (shards with none left out); a ValueError when the index
    was made for other shards."""
    positions = kept_positions(index)
    names = {posixpath.basename(shard.url) for shard in shards}
    unknown = sorted(set(positions) - names)
    if unknown:
        raise ValueError(f"data.keep={redact(index)!r} names shards that {redact(name)!r} does not have ({unknown[0]}, "
                         f"... {len(unknown)} in all): it was made for another dataset")
    kept = []
    for shard in shards:
        chosen = positions.get(posixpath.basename(shard.url), ())
        if chosen and chosen[-1] >= shard.count:
            raise ValueError(f"data.keep={redact(index)!r} keeps sample {chosen[-1]} of {posixpath.basename(shard.url)}, "
                             f"which holds {shard.count}: it was made for another version of {redact(name)!r}")
        if chosen:
            kept.append(ShardInfo(shard.url, len(chosen), chosen))
    if not kept:
        raise ValueError(f"data.keep={redact(index)!r} keeps no sample of {redact(name)!r}")
    return tuple(kept)

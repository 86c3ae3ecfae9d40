"""Where the loader's samples come from: datasets resolved into shard URLs with sample counts.

A dataset is a folder or object-store prefix with ``sizes.json`` (made by ``mmfuse shard``, img2dataset or
DataComp), a brace pattern (``s3://b/shard-{000000..000099}.tar``) or a single ``.tar``. Counts come from a
``sizes.json`` beside the shards; without one, each tar's headers are read once to count its samples.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import braceexpand

from data_pipeline.storage import filesystem, redact
from data_pipeline.tarstream import count_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int


@dataclass(frozen=True)
class Source:
    name: str
    shards: tuple[ShardInfo, ...]
    weight: float

    @property
    def samples(self) -> int:
        return sum(s.count for s in self.shards)


def resolve_sources(spec: str, weights: list[float] | None = None) -> list[Source]:
    """``a::b::c`` → one Source per dataset; weights default to dataset sizes."""
    names = [part.strip() for part in spec.split("::") if part.strip()]
    if not names:
        raise ValueError("no dataset given (train is empty)")
    sources = []
    for i, name in enumerate(names):
        shards = tuple(_resolve_one(name))
        if not shards:
            raise ValueError(f"dataset {redact(name)!r} has no shards")
        samples = sum(s.count for s in shards)
        weight = float(weights[i]) if weights else float(samples)
        sources.append(Source(name, shards, weight))
    return sources


def _resolve_one(name: str) -> list[ShardInfo]:
    if name.endswith(".tar") or "{" in name:
        urls = list(braceexpand.braceexpand(name))
        sizes = _sizes_beside(urls[0])
        return [ShardInfo(url, _count(url, sizes)) for url in urls]
    fs, root = filesystem(name)
    sizes_path = posixpath.join(root, "sizes.json")
    if not fs.exists(sizes_path):
        raise ValueError(f"{redact(name)!r} is neither a .tar, a brace pattern, nor a folder with sizes.json")
    sizes = json.loads(fs.cat_file(sizes_path))
    base = name.rstrip("/")
    return [ShardInfo(f"{base}/{shard}", int(count)) for shard, count in sorted(sizes.items())]


def _sizes_beside(url: str) -> dict[str, int]:
    fs, path = filesystem(url)
    sizes_path = posixpath.join(posixpath.dirname(path), "sizes.json")
    try:
        return json.loads(fs.cat_file(sizes_path)) if fs.exists(sizes_path) else {}
    except (OSError, ValueError):
        return {}


def _count(url: str, sizes: dict[str, int]) -> int:
    name = url.rsplit("/", 1)[-1]
    if name in sizes:
        return int(sizes[name])
    log.info("no sizes.json entry for %s: counting its samples from the tar headers", redact(url))
    return count_samples(url)

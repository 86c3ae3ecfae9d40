"""Contact sheets for ``mmfuse curate``'s report: per outcome (kept, and each reason a sample was dropped) a few
samples drawn reproducibly, each picture over its key and caption (a duplicate's caption names what it copies), so a
rule's mistakes can be seen rather than guessed."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa

from data_pipeline.config import extensions
from data_pipeline.curate.config import CurateConfig
from data_pipeline.loader.sources import ShardInfo
from data_pipeline.loader.tarstream import ShardError, iter_samples


def draw(index: pa.Table, per_outcome: int, seed: int = 0) -> dict[str, list[int]]:
    """{"kept" or a reason: up to ``per_outcome`` row numbers of the index, ascending}, the same for a seed."""
    reasons = np.asarray(index["reason"].to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    drawn = {}
    for outcome in ["", *sorted(set(reasons) - {""})]:
        rows = np.flatnonzero(reasons == outcome)
        if len(rows):
            drawn[outcome or "kept"] = sorted(rng.choice(rows, min(per_outcome, len(rows)), replace=False).tolist())
    return drawn


def sheets(index: pa.Table, captions: list[str], shards: tuple[ShardInfo, ...], cfg: CurateConfig,
           per_outcome: int) -> dict[str, bytes]:
    """{outcome: PNG contact sheet}; a sample whose image cannot be read shows as a grey cell."""
    from data_pipeline.inspect_page import contact_sheet, decode_image

    drawn = draw(index, per_outcome)
    names, positions = index["shard"].to_pylist(), index["position"].to_pylist()
    keys, copies = index["key"].to_pylist(), index["duplicate_of"].to_pylist()
    wanted: dict[str, set[int]] = {}
    for rows in drawn.values():
        for row in rows:
            wanted.setdefault(names[row], set()).add(positions[row])
    images = _images({posixpath.basename(s.url): s.url for s in shards}, wanted, cfg)
    result = {}
    for outcome, rows in drawn.items():
        cells = []
        for row in rows:
            data = images.get((names[row], keys[row]))
            try:
                picture = decode_image(data, cfg.max_image_pixels) if data else None
            except ValueError:
                picture = None
            text = f"copy of {copies[row]}: {captions[row]}" if copies[row] else captions[row]
            cells.append((picture, keys[row], text))
        result[outcome] = contact_sheet(cells, side=96)
    return result


def _images(urls: dict[str, str], wanted: dict[str, set[int]], cfg: CurateConfig) -> dict[tuple[str, str], bytes]:
    """{(shard, key): image bytes} of the samples at the wanted positions (each tar read only up to its last one)."""
    image_exts = extensions(cfg.members.image)
    found = {}
    for name, chosen in wanted.items():
        try:
            for raw in iter_samples(urls[name], set(image_exts), 50_000_000, positions=sorted(chosen)):
                data = next((raw.members[e] for e in image_exts if e in raw.members), None)
                if data is not None:
                    found[(name, raw.key)] = data
        except ShardError:
            continue  # the scan already reported the shard; its cells stay grey
    return found

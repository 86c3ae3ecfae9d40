"""``mmfuse inspect DATASET output.path=DIR``: look at a dataset before training on it.

A reproducible sample (``num_samples``, ``seed``) of a shards folder (sizes.json), an img2dataset output folder, a
.tar or brace pattern, or a manifest, local or on an object store, written as a contact sheet, an HTML page (each
image; each clip as waveform + mel strip; caption and key) and summary plots (docs/inspect.md).

Streaming: the shard index (sizes.json, or img2dataset's per-shard stats) picks the shards and the samples in them
without reading a tar; only the picked shards are opened, each read in 1 MB range requests up to its last drawn
sample and no further. A 1,000-shard dataset is inspected in seconds, and shards not drawn from may be missing or
corrupt without it noticing.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import posixpath
import random
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from data_pipeline.config import InputConfig, InspectConfig
from data_pipeline.errors import SampleError
from data_pipeline.preflight import check_input, check_output
from data_pipeline.loader.sources import shard_listing
from mmfuse.storage import filesystem, join
from mmfuse.redact import redact
from data_pipeline.loader.tarstream import RetryingFile, count_samples, split_name
from mmfuse.config import parse_args
from mmfuse.logs import setup_logging
from mmfuse.progress import progress

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20
"""Bytes per range request to an object store: reading stops within 1 MB of the last drawn sample."""
MEMBER_KINDS = {**dict.fromkeys(("jpg", "jpeg", "png", "webp"), "image"),
                **dict.fromkeys(("txt", "text", "caption"), "text"),
                **dict.fromkeys(("flac", "wav", "mp3", "ogg"), "audio"), "json": "json"}
MANIFEST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json")
INDEX_FILES = ("sizes.json", "dataset.json")
PROGRESS_DELAY = 2.0
"""A bar appears only when reading takes longer than this: most inspections end before it would say anything."""
READERS = 8
"""Shards read (or manifest rows fetched) at once: object-store latency, not CPU, bounds this."""


@dataclass
class Sample:
    """One drawn sample as read: its members' raw bytes by modality, where it came from, and what went wrong."""

    key: str
    origin: str
    """Where it was read: ``shard-000003.tar #17`` or ``manifest.parquet row 17``."""
    image: bytes | None = None
    audio: bytes | None = None
    caption: str | None = None
    meta: dict | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Drawn:
    """What ``draw`` found: the dataset as its index describes it, and the samples drawn from it."""

    layout: str
    """mmfuse (sizes.json), img2dataset (tars with their _stats.json), tars (a .tar or brace pattern) or manifest."""
    samples: list[Sample]
    total: int
    """Samples in the dataset by its index (rows of a manifest)."""
    shard_counts: dict[str, int] = field(default_factory=dict)
    """Samples per shard, from the index, in shard order (empty for a manifest)."""
    opened: list[str] = field(default_factory=list)
    """The shards read (a manifest: none)."""
    failures: Counter = field(default_factory=Counter)
    failures_from: str = "sharding stats"
    problems: list[str] = field(default_factory=list)
    """What went wrong with the dataset itself (a drawn shard missing or corrupt)."""


def choose_shards(counts: list[int | None], shards: int, seed: int) -> list[int]:
    """Positions of the shards to draw from, in dataset order: ``shards`` of the non-empty ones (an unknown count may
    be non-empty) picked uniformly by ``seed``; all of them when ``shards`` is 0 or there are no more."""
    candidates = [i for i, count in enumerate(counts) if count != 0]
    if shards and len(candidates) > shards:
        candidates = sorted(random.Random(f"{seed}:shards").sample(candidates, shards))
    return candidates


def draw_indices(counts: list[int], num_samples: int, seed: int) -> list[tuple[int, int]]:
    """``num_samples`` distinct ``(shard, index in shard)`` drawn uniformly from shards holding ``counts`` samples
    (all of them when they hold fewer), in reading order. ``random.sample`` of a range draws without building it."""
    ends = list(itertools.accumulate(counts))
    total = ends[-1] if ends else 0
    picks = sorted(random.Random(f"{seed}:samples").sample(range(total), min(num_samples, total)))
    drawn = []
    for pick in picks:
        shard = bisect.bisect_right(ends, pick)
        drawn.append((shard, pick - (ends[shard - 1] if shard else 0)))
    return drawn


def is_manifest(cfg: InspectConfig) -> bool:
    name = cfg.path.lower().rstrip("/")
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    return cfg.manifest.format != "auto" or name.endswith(MANIFEST_SUFFIXES)


def dataset_url(path: str) -> str:
    """``DIR/sizes.json`` or ``DIR/dataset.json`` given for a dataset means ``DIR``."""
    head, _, tail = path.rstrip("/").rpartition("/")
    return head if tail in INDEX_FILES and head else path


def draw(cfg: InspectConfig) -> Drawn:
    return draw_manifest(cfg) if is_manifest(cfg) else draw_shards(cfg)


def draw_shards(cfg: InspectConfig) -> Drawn:
    try:
        listing = shard_listing(cfg.path)
    except ValueError as err:
        raise ValueError(f"path: {err}") from None
    counts = [count for _, count in listing]
    names = [url.rsplit("/", 1)[-1] for url, _ in listing]
    if None not in counts and sum(counts) == 0:
        raise ValueError(f"path: {redact(cfg.path)!r} holds no samples (its {len(counts)} shard(s) all have 0 in its "
                         "index)")
    drawn = Drawn(layout(cfg.path), [], 0)
    chosen = choose_shards(counts, cfg.shards, cfg.seed)
    known = {}
    for i in chosen:  # an img2dataset shard without a stats file: its tar headers say how many samples it holds
        try:
            known[i] = counts[i] if counts[i] is not None else count_samples(listing[i][0])
        except (tarfile.TarError, EOFError, OSError) as err:
            known[i] = 0
            drawn.problems.append(f"{names[i]}: cannot be read ({type(err).__name__})")
    by_shard: dict[int, list[int]] = {}
    for position, index in draw_indices([known[i] for i in chosen], cfg.num_samples, cfg.seed):
        by_shard.setdefault(chosen[position], []).append(index)
    bar = progress(len(by_shard), "inspect", "shard", disable=not cfg.progress, delay=PROGRESS_DELAY)
    with ThreadPoolExecutor(min(READERS, max(1, len(by_shard)))) as pool:
        jobs = [(i, pool.submit(read_shard, listing[i][0], indices, cfg)) for i, indices in sorted(by_shard.items())]
        for i, job in jobs:
            samples, problem = job.result()
            drawn.samples += samples
            drawn.opened.append(names[i])
            if problem:
                drawn.problems.append(f"{names[i]}: {problem}")
            bar.update(1)
    bar.close()
    # A shard without a count that was not drawn from stays unread: it is plotted (and totalled) as 0.
    drawn.shard_counts = {name: known.get(i, 0) if count is None else count
                          for i, (name, count) in enumerate(zip(names, counts))}
    drawn.total = sum(drawn.shard_counts.values())
    drawn.failures = sharding_failures(drawn.layout, cfg.path, [url for url, _ in listing])
    return drawn


def layout(path: str) -> str:
    if path.endswith(".tar") or "{" in path:
        return "tars"
    fs, root = filesystem(path)
    return "mmfuse" if fs.exists(join(root, "sizes.json")) else "img2dataset"


def read_shard(url: str, indices: list[int], cfg: InspectConfig) -> tuple[list[Sample], str]:
    """The samples at ``indices`` (ascending) of one tar, and what went wrong with the tar ("" if nothing). Headers
    are walked with seeks (members not drawn are never read) and reading stops at the last drawn sample."""
    name = url.rsplit("/", 1)[-1]
    wanted, last = set(indices), indices[-1]
    found: dict[int, Sample] = {}
    problem = ""
    try:
        with RetryingFile(url, block_size=READ_BLOCK) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            index, key, current = -1, None, None
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header otherwise
                if not info.isfile():
                    continue
                member_key, ext = split_name(info.name)
                if member_key != key:
                    if index == last:
                        break
                    index, key = index + 1, member_key
                    current = found.setdefault(index, Sample(key, f"{name} #{index}")) if index in wanted else None
                if current is not None:
                    _take(current, ext, info, tar, cfg.max_member_bytes)
    except FileNotFoundError:
        problem = "shard missing"
    except (tarfile.TarError, EOFError, OSError) as err:
        problem = f"truncated or corrupt tar ({type(err).__name__})"
    if not problem and len(found) < len(indices):
        problem = f"holds fewer samples than its index says (sample #{last} wanted)"
    reason = problem.split(" (")[0]
    return [found.get(i) or Sample(f"{name}#{i}", f"{name} #{i}", problems=[reason]) for i in indices], problem


def _take(sample: Sample, ext: str, info: tarfile.TarInfo, tar: tarfile.TarFile, limit: int) -> None:
    """Keep one member of a drawn sample (the first of each modality)."""
    kind = MEMBER_KINDS.get(ext)
    if kind is None or getattr(sample, {"text": "caption", "json": "meta"}.get(kind, kind)) is not None:
        return
    if info.size > limit:
        sample.problems.append(f"{ext}: {info.size} bytes, over max_member_bytes")
        return
    data = tar.extractfile(info).read()
    if len(data) != info.size:
        sample.problems.append(f"{ext}: cut short")
    elif kind == "image":
        sample.image = data
    elif kind == "audio":
        sample.audio = data
    elif kind == "text":
        sample.caption = data.decode("utf-8", "replace")
    else:
        try:
            meta = json.loads(data)
        except (ValueError, RecursionError):
            sample.problems.append("json: not valid JSON")
            return
        sample.meta = meta if isinstance(meta, dict) else {"value": meta}
        caption = sample.meta.get("caption", sample.meta.get("text"))  # LAION-CLAP keeps the caption in the json
        if isinstance(caption, list):  # LAION-CLAP's audio-dataset layout: a list of captions, the first shown
            caption = next((c for c in caption if isinstance(c, str) and c.strip()), None)
        if sample.caption is None and isinstance(caption, str):
            sample.caption = caption


def sharding_failures(kind: str, dataset: str, urls: list[str]) -> Counter:
    """Failure reasons from the sharding stats: ``dataset.json``'s sum of them where ``mmfuse shard`` wrote one (one
    read), else each shard's stats file, fetched in one batch: ours count them in ``failed``, img2dataset's in
    ``status_dict`` (everything but ``success``)."""
    if kind == "mmfuse":
        fs, root = filesystem(dataset)
        try:
            failed = json.loads(fs.cat_file(join(root, "dataset.json"))).get("failed")
        except (OSError, ValueError, AttributeError):  # not there (an unfinished run), unreadable, not an object
            failed = None
        if isinstance(failed, dict):
            return Counter({str(r): n for r, n in failed.items() if isinstance(n, int)})
    failures: Counter = Counter()
    if not urls:
        return failures
    fs, _ = filesystem(urls[0])
    paths = [filesystem(url)[1].removesuffix(".tar") + "_stats.json" for url in urls]
    for data in fs.cat(paths, on_error="omit").values():
        try:
            stats = json.loads(data)
        except (ValueError, TypeError):
            continue
        if not isinstance(stats, dict):
            continue
        reasons = stats.get("failed") if isinstance(stats.get("failed"), dict) else stats.get("status_dict", {})
        if isinstance(reasons, dict):
            failures.update({str(r): int(n) for r, n in reasons.items() if r != "success" and isinstance(n, int)})
    return failures


def draw_manifest(cfg: InspectConfig) -> Drawn:
    """Rows drawn uniformly from the manifest(s), their media fetched as ``mmfuse shard`` would (local, http, s3)."""
    from data_pipeline.shard.fetchers import Fetcher
    from data_pipeline.shard.readers import list_sources, load_rows

    columns = cfg.manifest
    input_cfg = InputConfig(path=cfg.path, format=columns.format, image_column=columns.image_column,
                            text_column=columns.text_column, audio_column=columns.audio_column)
    try:
        rows = [(source, row) for source, fmt in list_sources(input_cfg)
                for row in load_rows(source, fmt, input_cfg, require_text=False)]
    except ValueError as err:  # the readers' messages name shard's keys: these are the same columns under manifest.
        raise ValueError(str(err).replace("input.path", "path").replace("input.", "manifest.")) from None
    if not rows:
        raise ValueError(f"path: the manifest {redact(cfg.path)!r} holds no rows")
    picks = sorted(random.Random(f"{cfg.seed}:samples").sample(range(len(rows)), min(cfg.num_samples, len(rows))))
    fetcher = Fetcher(cfg.fetch)

    def fetch(position: int) -> Sample:
        source, row = rows[position]
        key = next((str(row.extra[c]) for c in ("key", "id", "__key__") if row.extra.get(c) is not None), f"row{position}")
        sample = Sample(key, f"{posixpath.basename(redact(source))} row {row.index}")
        sample.caption = row.text.decode("utf-8", "replace") if isinstance(row.text, bytes) else row.text
        for kind, location in (("image", row.image), ("audio", row.audio), ("caption", row.text_location)):
            if not location:
                continue
            try:
                data = fetcher.fetch(location)
            except SampleError as err:
                sample.problems.append(f"{kind}: {err.reason}")
                continue
            setattr(sample, kind, data.decode("utf-8", "replace") if kind == "caption" else data)
        return sample

    with ThreadPoolExecutor(min(cfg.fetch.threads, READERS)) as pool:
        fetched = pool.map(fetch, picks)
        bar = progress(len(picks), "inspect", "row", disable=not cfg.progress, iterable=fetched, delay=PROGRESS_DELAY)
        samples = list(bar)
    failures = Counter(problem.split(": ", 1)[1] for sample in samples for problem in sample.problems)
    return Drawn("manifest", samples, len(rows), failures=failures, failures_from="the drawn rows (fetched now)")


def run(cfg: InspectConfig) -> dict:
    """Draw, read, and write the page; returns what samples.json holds."""
    from data_pipeline.inspect_page import build_page, write_files

    cfg.path = dataset_url(cfg.path)
    if not any(ch in cfg.path for ch in "*?[{"):
        check_input("path", cfg.path)
    check_output("output.path", cfg.output.path)
    drawn = draw(cfg)
    for problem in drawn.problems:
        log.warning("%s", problem)
    files, summary = build_page(cfg, drawn)
    if not summary["shown"]:  # nothing decoded: no page of empty boxes and exit 0
        reasons = Counter(p.split(" (")[0] for s in summary["samples"] for p in s["problems"])
        said = ", ".join(f"{reason}={n}" for reason, n in reasons.most_common(3)) or "nothing in them to show"
        raise ValueError(f"path: none of the {len(drawn.samples)} sample(s) drawn from {redact(cfg.path)!r} could be "
                         f"read ({said})")
    write_files(cfg.output.path, files)
    where = f"{len(drawn.opened)} of {len(drawn.shard_counts)} shards" if drawn.layout != "manifest" else "the manifest"
    print(f"{redact(cfg.path)} ({drawn.layout}): {len(drawn.samples)} samples drawn from {where}, {summary['shown']} "
          f"shown -> {redact(join(cfg.output.path, 'index.html'))}")
    return summary


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = parse_args(InspectConfig, argv, prog="mmfuse inspect", description=__doc__.split("\n\n")[0], positional="path")
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The per-shard worker: a picklable callable ``ShardWorker(cfg)(task) -> stats``.

Rows are fetched and processed by a thread pool (fetching is I/O-bound; Pillow, soundfile and soxr release the
GIL while they work) and written in input order, so a shard's bytes depend only on its rows. One bad sample
never kills a shard: it is recorded with its reason and the shard goes on.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator

import pyarrow.parquet as pq

from data_pipeline.config import ShardConfig
from data_pipeline.errors import SampleError, sample_step
from data_pipeline.shard.fetchers import Fetcher
from data_pipeline.image import process_image
from data_pipeline.shard.readers import Row, ShardTask, read_rows
from mmfuse.storage import filesystem, join
from mmfuse.redact import redact
from data_pipeline.text import process_text
from data_pipeline.shard.writer import ShardWriter, sample_key, shard_name

# Settings that do not change what a shard contains (excluded from the config fingerprint).
_RUNTIME_KEYS = ("processes", "progress", "retry_failed", "fetch.threads")


@dataclass
class Processed:
    """The outcome of one row: members to write, or the reason it failed."""

    key: str
    row: Row
    members: dict[str, bytes] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    content_hash: str = ""
    reason: str = ""
    detail: str = ""
    cleaned: str = ""
    """What was repaired in a sample that is kept (``text_control_chars``), counted in the stats' ``cleaned``."""


class ShardWorker:
    """Writes one shard per call. Holds only the config, so it pickles cheaply to any process or SLURM task."""

    def __init__(self, cfg: ShardConfig, fingerprint: str = "", on_sample: Callable[[bool], None] | None = None):
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.on_sample = on_sample
        self._fetcher: Fetcher | None = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "fingerprint": self.fingerprint, "on_sample": None, "_fetcher": None}

    def __call__(self, task: ShardTask) -> dict:
        started = time.time()
        self._fetcher = self._fetcher or Fetcher(self.cfg.fetch)
        rows = read_rows(task, self.cfg.input)
        previous = self._previous_successes(task) if self.cfg.retry_failed else {}
        writer = ShardWriter(self.cfg.output, task.shard_id)
        failed: Counter[str] = Counter()
        cleaned: Counter[str] = Counter()
        seen_hashes: set[str] = set()
        sizes: Counter[str] = Counter()
        duplicate_rows = set(task.duplicate_rows)
        try:
            for result in self._process_all(task, rows, duplicate_rows, previous):
                if not result.reason and result.content_hash in seen_hashes:
                    result.reason = "duplicate"
                if result.reason:
                    failed[result.reason] += 1
                else:
                    seen_hashes.add(result.content_hash)
                    if result.cleaned:
                        cleaned[result.cleaned] += 1
                    writer.write({"__key__": result.key, **result.members})
                    for ext, data in result.members.items():
                        sizes[ext] += len(data)
                writer.record(_record(result))
                if self.on_sample:
                    self.on_sample(not result.reason)
            stats = {
                "shard": writer.name,
                "input_rows": len(rows),
                "written": writer.written,
                "failed": dict(sorted(failed.items())),
                "cleaned": dict(sorted(cleaned.items())),
                "bytes": {"members": dict(sorted(sizes.items()))},
                "seconds": round(time.time() - started, 3),
                "config_fingerprint": self.fingerprint,
                "source": redact(task.source),
                "row_range": [task.row_start, task.row_end],
            }
            return writer.close(stats)
        except BaseException:
            writer.abort()
            raise

    def _process_all(self, task: ShardTask, rows: list[Row], duplicates: set[int], previous: dict) -> Iterator[Processed]:
        def work(item: tuple[int, Row]) -> Processed:
            index, row = item
            key = sample_key(task.shard_id, index, self.cfg.output.samples_per_shard)
            if row.index in duplicates:
                return Processed(key, row, reason="duplicate")
            if key in previous:
                return previous[key]
            return self.process_row(key, row)

        with ThreadPoolExecutor(self.cfg.fetch.threads, thread_name_prefix="fetch") as pool:
            yield from ordered_map(pool, work, enumerate(rows), window=self.cfg.fetch.threads * 4)

    def process_row(self, key: str, row: Row) -> Processed:
        result = Processed(key, row)
        try:
            self._fill(result)
        except SampleError as err:
            result.reason, result.detail = err.reason, err.detail
            result.members, result.cleaned = {}, ""
        return result

    def _fill(self, result: Processed) -> None:
        row, fetch, cfg = result.row, self._fetcher.fetch, self.cfg
        text = fetch(row.text_location) if row.text_location else row.text
        present = {"image": bool(row.image), "text": text is not None, "audio": bool(row.audio)}
        for modality in cfg.require:
            if not present[modality]:
                raise SampleError(f"missing_{modality}")
        if not any(present.values()):
            raise SampleError("empty_sample", "no image, text or audio")
        digest = hashlib.sha256()
        meta: dict = {"key": result.key, "source": {}}
        if present["image"]:
            raw = fetch(row.image)
            digest.update(b"image" + hashlib.sha256(raw).digest())
            with sample_step("image_decode_error"):  # process_image names its own steps; this is the net
                result.members[cfg.image.format], image_meta = process_image(raw, cfg.image)
            meta["source"]["image"] = redact(row.image)
            meta.update(image_meta)
            meta["sha256_image"] = hashlib.sha256(result.members[cfg.image.format]).hexdigest()
        if present["text"]:
            caption, stripped = process_text(text, cfg.text)
            if stripped:
                result.cleaned, result.detail = "text_control_chars", f"{stripped} control characters stripped"
            digest.update(b"text" + caption.encode())
            result.members["txt"] = caption.encode()
        if present["audio"]:
            from data_pipeline.audio import process_audio  # soundfile + soxr: loaded by audio datasets only

            raw = fetch(row.audio)
            digest.update(b"audio" + hashlib.sha256(raw).digest())
            with sample_step("audio_decode_error"):
                result.members["flac"], audio_meta = process_audio(raw, cfg.audio)
            meta["source"]["audio"] = redact(row.audio)
            meta.update(audio_meta)
            meta["sha256_audio"] = hashlib.sha256(result.members["flac"]).hexdigest()
        extra = dict(row.extra)
        if row.json_location:
            extra.update(_json_fields(fetch(row.json_location)))
        for name, value in extra.items():
            meta.setdefault(name, value)
        result.meta = meta
        result.content_hash = digest.hexdigest()
        result.members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode()

    def _previous_successes(self, task: ShardTask) -> dict[str, Processed]:
        """Retry mode: the good samples of a finished shard, read back so only its failures are redone."""
        fs, root = filesystem(self.cfg.output.path)
        base = join(root, shard_name(self.cfg.output.prefix, task.shard_id))
        if not fs.exists(base + "_stats.json"):
            return {}
        table = pq.read_table(io.BytesIO(fs.cat_file(base + ".parquet")))
        listed = table.select(["key", "status", "content_hash", "detail"]).to_pylist()
        good = {r["key"]: r for r in listed if r["status"] == "success"}
        members: dict[str, dict[str, bytes]] = {}
        with fs.open(base + ".tar", "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if key in good and info.isfile():
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        rows = {sample_key(task.shard_id, i, self.cfg.output.samples_per_shard): r for i, r in enumerate(read_rows(task, self.cfg.input))}
        out = {}
        for key, found in members.items():
            meta = json.loads(found.get("json", b"{}"))
            # A kept sample's detail says what was cleaned (only captions are, so far): the stats count it again.
            detail = good[key]["detail"] or ""
            out[key] = Processed(key, rows[key], found, meta, content_hash=good[key]["content_hash"], detail=detail,
                                 cleaned="text_control_chars" if detail else "")
        return out


def _json_fields(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: "[[[[..." nested deep
        raise SampleError("bad_json", f"{type(err).__name__}: {err}"[:200]) from None
    if not isinstance(value, dict):
        raise SampleError("bad_json", "not an object")
    return value


def _record(result: Processed) -> dict:
    row = result.row
    record = {
        "key": result.key,
        "status": "failed" if result.reason else "success",
        "error": result.reason or None,
        "detail": result.detail or None,
        "image": redact(row.image) if row.image else None,
        "audio": redact(row.audio) if row.audio else None,
        "text": row.text if isinstance(row.text, str) else None,
        "text_file": row.text_location,
        "content_hash": result.content_hash or None,
    }
    for name in ("width", "height", "original_width", "original_height", "audio_seconds"):
        record[name] = result.meta.get(name)
    for name, value in row.extra.items():
        record.setdefault(name, value)
    return record


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.map`` in input order with at most ``window`` tasks in flight (bounded memory)."""
    items = iter(items)
    pending = deque(pool.submit(fn, item) for item in islice(items, window))
    while pending:
        result = pending.popleft().result()
        for item in islice(items, 1):
            pending.append(pool.submit(fn, item))
        yield result


def config_fingerprint(cfg: ShardConfig) -> str:
    """A hash of everything that decides a shard's contents, stored in each stats file: a rerun with other
    settings into the same folder is refused instead of mixing two datasets."""
    from mmfuse.config import to_dict

    values = to_dict(cfg)
    for dotted in _RUNTIME_KEYS:
        section, _, name = dotted.rpartition(".")
        (values[section] if section else values).pop(name, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

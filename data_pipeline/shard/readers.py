"""Readers: turn an input (manifest file(s) or a folder) into rows, and cut it into shard descriptors.

Shards are row ranges of each input file, so the shard → keys mapping depends only on the input and
``samples_per_shard``, never on the number of workers. A descriptor holds paths and ranges, not data; each worker
process reads (and caches) the input it needs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from data_pipeline.config import InputConfig
from mmfuse.storage import filesystem
from mmfuse.redact import redact

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
AUDIO_EXTENSIONS = {"flac", "wav", "ogg", "mp3", "opus"}
TEXT_EXTENSIONS = {"txt"}
JSON_EXTENSIONS = {"json"}


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: rows ``[row_start, row_end)`` of ``source``."""

    shard_id: int
    source: str
    format: str
    row_start: int
    row_end: int
    duplicate_rows: tuple[int, ...] = ()
    """Rows of this range that repeat an earlier row of the run (dropped as duplicates)."""


@dataclass
class Row:
    """One input sample as locations and inline values, before anything is fetched."""

    index: int
    image: str | None = None
    audio: str | None = None
    text: str | bytes | None = None
    text_location: str | None = None
    """Folder input: the caption lives in a .txt file to fetch."""
    json_location: str | None = None
    """Folder input: a .json file whose fields pass through."""
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> str:
        """What makes two rows the same input (used for run-wide duplicate detection)."""
        text = self.text.decode("utf-8", "replace") if isinstance(self.text, bytes) else self.text
        parts = [self.image, self.audio, text, self.text_location]
        return hashlib.sha1(repr(parts).encode()).hexdigest()


def detect_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.lower().removesuffix(".gz").removesuffix(".zst").removesuffix(".bz2")
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    fs, inner = filesystem(path)
    if fs.isdir(inner):
        return "folder"
    raise ValueError(f"cannot tell the format of input {redact(path)!r}; set input.format to parquet, csv, tsv, jsonl or folder")


def list_sources(cfg: InputConfig) -> list[tuple[str, str]]:
    """The input files as (url, format), sorted; a glob expands to many manifests of one format."""
    fs, inner = filesystem(cfg.path)
    protocol = cfg.path.split("://", 1)[0] + "://" if "://" in cfg.path else ""
    if any(ch in inner for ch in "*?["):
        matches = sorted(fs.glob(inner))
        if not matches:
            raise ValueError(f"input.path {redact(cfg.path)!r} matches no file")
        return [(protocol + m if protocol else m, detect_format(m, cfg.format)) for m in matches]
    if not fs.exists(inner):
        raise ValueError(f"input.path {redact(cfg.path)!r} does not exist")
    return [(cfg.path, detect_format(cfg.path, cfg.format))]


def plan_shards(cfg: InputConfig, samples_per_shard: int, dedup: bool) -> list[ShardTask]:
    """Cut every source into row ranges of ``samples_per_shard``; shard ids run on across sources."""
    tasks: list[ShardTask] = []
    seen: set[str] = set()
    for source, fmt in list_sources(cfg):
        rows = load_rows(source, fmt, cfg)
        duplicates = []
        if dedup:
            for row in rows:
                key = row.identity()
                if key in seen:
                    duplicates.append(row.index)
                seen.add(key)
        for start in range(0, len(rows), samples_per_shard):
            end = min(start + samples_per_shard, len(rows))
            dups = tuple(i for i in duplicates if start <= i < end)
            tasks.append(ShardTask(len(tasks), source, fmt, start, end, dups))
    if not tasks:
        raise ValueError(f"input {redact(cfg.path)!r} holds no rows")
    return tasks


def read_rows(task: ShardTask, cfg: InputConfig) -> list[Row]:
    return load_rows(task.source, task.format, cfg)[task.row_start : task.row_end]


@functools.lru_cache(maxsize=2)
def _cached_rows(source: str, fmt: str, columns: tuple[str, str, str], pass_through: bool,
                 require_text: bool) -> tuple[Row, ...]:
    if fmt == "folder":
        return tuple(_folder_rows(source))
    table = _read_table(source, fmt, columns)
    return tuple(_table_rows(table, source, columns, pass_through, require_text))


def load_rows(source: str, fmt: str, cfg: InputConfig, require_text: bool = True) -> tuple[Row, ...]:
    """All rows of one source (cached per process: a worker writing many shards reads its manifest once).
    ``require_text``: a manifest without ``cfg.text_column`` (unless that is empty) is an error."""
    columns = (cfg.image_column, cfg.text_column, cfg.audio_column)
    return _cached_rows(source, fmt, columns, cfg.pass_through, require_text)


def _read_table(source: str, fmt: str, columns: tuple[str, str, str]) -> pa.Table:
    fs, inner = filesystem(source)
    with fs.open(inner, "rb", compression="infer") as f:
        data = f.read()
    try:
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        if fmt in ("csv", "tsv"):
            # Path and caption columns stay strings even when they look like numbers.
            header = data.split(b"\n", 1)[0].decode("utf-8", "replace")
            delimiter = "\t" if fmt == "tsv" else ","
            names = [c.strip().strip('"') for c in header.split(delimiter)]
            types = {c: pa.string() for c in columns if c in names}
            return pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
            )
        if fmt == "jsonl":
            return pajson.read_json(io.BytesIO(data))
    except pa.ArrowException as err:
        raise ValueError(f"cannot read {fmt} manifest {redact(source)!r}: {err}") from None
    raise ValueError(f"unknown input format {fmt!r}")


def _resolve(location: Any, base: str) -> str | None:
    """Manifest paths are relative to the manifest's folder unless absolute or a URL."""
    if location is None:
        return None
    location = str(location).strip()
    if not location:
        return None
    if "://" in location or location.startswith("/"):
        return location
    return posixpath.join(base, location)


def _table_rows(table: pa.Table, source: str, columns: tuple[str, str, str], pass_through: bool,
                require_text: bool) -> list[Row]:
    image_col, text_col, audio_col = columns
    present = [c for c in columns if c and c in table.column_names]
    if not present:
        raise ValueError(
            f"manifest {redact(source)!r} has none of the columns {list(columns)} (it has {table.column_names}); "
            "set input.image_column / input.text_column / input.audio_column"
        )
    if require_text and text_col and text_col not in table.column_names:
        # Without this, a caption column named otherwise (img2dataset's "caption") shards every image without text.
        raise ValueError(
            f"manifest {redact(source)!r} has no text column {text_col!r} (it has {table.column_names}); "
            "set input.text_column, or input.text_column='' for a dataset without captions"
        )
    base = posixpath.dirname(source)
    data = table.to_pydict()
    extra_cols = [c for c in table.column_names if c not in columns] if pass_through else []
    rows = []
    for i in range(table.num_rows):
        rows.append(
            Row(
                index=i,
                image=_resolve(data[image_col][i], base) if image_col in data else None,
                audio=_resolve(data[audio_col][i], base) if audio_col in data else None,
                text=data[text_col][i] if text_col in data else None,
                extra={c: data[c][i] for c in extra_cols},
            )
        )
    return rows


def _folder_rows(source: str) -> list[Row]:
    """Group the files of a folder by stem (relative path without extension): a.jpg + a.txt + a.flac."""
    fs, inner = filesystem(source)
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    groups: dict[str, dict[str, str]] = {}
    root = inner.rstrip("/")
    for path in sorted(fs.find(inner)):
        rel = path[len(root) :].lstrip("/")
        stem, dot, ext = rel.rpartition(".")
        if not dot or posixpath.basename(rel).startswith("."):
            continue
        ext = ext.lower()
        kind = (
            "image" if ext in IMAGE_EXTENSIONS else
            "audio" if ext in AUDIO_EXTENSIONS else
            "text" if ext in TEXT_EXTENSIONS else
            "json" if ext in JSON_EXTENSIONS else None
        )
        if kind:
            groups.setdefault(stem, {})[kind] = protocol + path
    rows = []
    for index, stem in enumerate(sorted(groups)):
        files = groups[stem]
        if not files.keys() & {"image", "audio", "text"}:
            continue
        rows.append(
            Row(
                index=len(rows),
                image=files.get("image"),
                audio=files.get("audio"),
                text_location=files.get("text"),
                json_location=files.get("json"),
                extra={"stem": stem},
            )
        )
    return rows

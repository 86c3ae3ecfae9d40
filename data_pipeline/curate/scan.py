"""Read every sample of a shard once and keep what the filters decide on: per sample its position in the tar, key,
image content digest, perceptual hash (when near-duplicate removal is on), size and caption. One parquet per shard
under ``OUT/scan/``, written when the shard is done, so a rerun scans only the shards it has not (and those scanned
without the hashes a rule now needs)."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_pipeline.config import extensions
from data_pipeline.curate.config import CurateConfig
from data_pipeline.loader.sources import ShardInfo
from data_pipeline.loader.tarstream import ShardError, iter_samples

SCHEMA = pa.schema([
    ("shard", pa.string()), ("position", pa.int32()), ("key", pa.string()),
    ("digest", pa.string()),  # blake2b-128 of the image bytes; "" without a readable image
    ("phash", pa.uint64()),  # imagehash.phash's 64 bits (perceptual_hash); 0 without a readable image or a hash
    ("width", pa.int32()), ("height", pa.int32()),
    ("caption", pa.string()),
    ("problem", pa.string()),  # "" or why the sample cannot be judged: image_missing, image_unreadable
])


SCORER = "pretrain.scorer:Scorer"


# The scan parquet's schema metadata: whether its phash column holds hashes (a scan for rules without near-duplicate
# removal skips them, a third of a scan's time without a scorer).
HASHED = b"mmfuse.phash"


@dataclass(frozen=True)
class ScanTask:
    shard: ShardInfo
    out: str
    """Where the shard's scan parquet goes."""
    phash: bool = True
    """Whether the scan computes perceptual hashes (``dedup.near``)."""


def scan_path(root: str, shard_url: str) -> str:
    return posixpath.join(root, "scan", posixpath.basename(shard_url).removesuffix(".tar") + ".parquet")


def scanned(task: ScanTask) -> bool:
    """Whether the shard's scan is written (a scan appears only whole) with the hashes the task needs."""
    import pyarrow.parquet as pq

    from mmfuse.storage import filesystem

    fs, path = filesystem(task.out)
    if not fs.exists(path):
        return False
    if not task.phash:
        return True
    with fs.open(path, "rb") as f:
        return (pq.read_schema(f).metadata or {}).get(HASHED, b"true") == b"true"  # scans from before: hashed


def scan_shard(task: ScanTask, cfg: CurateConfig, on_sample=lambda success: None, scorer=None) -> pa.Table:
    """One shard's rows (``SCHEMA``, plus the ``scorer``'s columns when given); a ShardError when the tar itself is
    unreadable."""
    image_exts, text_exts = extensions(cfg.members.image), extensions(cfg.members.text)
    wanted = {*image_exts, *text_exts, cfg.members.json}
    if scorer is not None:
        wanted |= {*extensions(cfg.members.audio)}
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    name = posixpath.basename(task.shard.url)
    scores: list[dict] = []
    pending: list = []
    for position, raw in enumerate(iter_samples(task.shard.url, wanted, max_member_bytes=50_000_000)):
        if scorer is not None:
            pending.append(raw)
            if len(pending) == cfg.scorer_batch_size:
                scores.append(scorer(pending))
                pending = []
        image = next((raw.members[e] for e in image_exts if e in raw.members), None)
        digest, phash, size, problem = "", 0, (0, 0), ""
        if image is None:
            problem = "image_missing"
        else:
            digest = hashlib.blake2b(image, digest_size=16).hexdigest()
            try:
                if task.phash:
                    phash, size = perceptual_hash(image, cfg.max_image_pixels)
                else:
                    size = readable(image, cfg.max_image_pixels)
            except ValueError:
                problem = "image_unreadable"
        for column, value in (("shard", name), ("position", position), ("key", raw.key), ("digest", digest),
                              ("phash", phash), ("width", size[0]), ("height", size[1]),
                              ("caption", caption(raw.members, text_exts, cfg)), ("problem", problem)):
            rows[column].append(value)
        on_sample(not problem)
    table = pa.Table.from_pydict(rows, schema=SCHEMA.with_metadata({HASHED: b"true" if task.phash else b"false"}))
    if scorer is None:
        return table
    if pending:
        scores.append(scorer(pending))
    return add_scores(table, scores)


def add_scores(table: pa.Table, scores: list[dict]) -> pa.Table:
    """The scorer's similarities (float32, NaN where unjudged) and embeddings (fp16 vectors) as columns."""
    for column in ("image_text", "audio_text", "image", "text", "audio"):
        values = np.concatenate([part[column] for part in scores]) if scores else np.zeros(0, np.float32)
        if values.ndim == 2:
            array = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
            table = table.append_column(f"{column}_embedding", array)
        else:
            table = table.append_column(f"{column}_similarity" if "_" in column else column, pa.array(values))
    return table


def perceptual_hash(data: bytes, max_pixels: int) -> tuple[int, tuple[int, int]]:
    """(64-bit DCT hash, (width, height)) of an encoded image; a ValueError when it does not decode or claims
    more than ``max_pixels`` pixels (checked from the header, before decoding).

    The hash is imagehash's ``phash`` (greyscale, Lanczos to 32x32, 2-D DCT-II, the 8x8 lowest frequencies against
    their median), with the DCT as two products with the 8 needed rows of its matrix instead of two full scipy
    transforms: half the time of ``imagehash.phash`` per image, the same bits (tests/unit/test_curate_filters.py)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        size = image.size  # as stored: draft() below changes it
        if size[0] * size[1] > max_pixels:
            raise ValueError(f"{size[0]}x{size[1]} pixels")
        image.draft("L", (64, 64))  # JPEG: decode at a reduced scale, enough for a 32x32 hash input
        pixels = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(type(err).__name__) from None
    low = _DCT_ROWS @ pixels @ _DCT_ROWS.T
    return int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big"), size


def readable(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an encoded image that decodes, checked as ``perceptual_hash`` checks it, at the least
    cost: a JPEG decodes at an eighth of its size (every coefficient is still read, so a truncated or corrupt
    stream fails as it would at full size). A ValueError otherwise."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        size = image.size
        if size[0] * size[1] > max_pixels:
            raise ValueError(f"{size[0]}x{size[1]} pixels")
        image.draft("L", (1, 1))
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(type(err).__name__) from None
    return size


# Rows 0-7 of the unnormalised 32-point DCT-II matrix (scipy.fftpack.dct's default: y[k] = 2 sum x[n] cos(...)).
_DCT_ROWS = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)


def caption(members: dict[str, bytes], text_exts: list[str], cfg: CurateConfig) -> str:
    data = next((members[e] for e in text_exts if e in members), None)
    if data is not None:
        return data.decode("utf-8", errors="replace")
    try:
        meta = json.loads(members.get(cfg.members.json, b"{}"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return ""
    value = meta.get(cfg.members.text_json_field, "") if isinstance(meta, dict) else ""
    return value if isinstance(value, str) else ""


class ScanWorker:
    """Scans one shard into its parquet (the distributor's per-task callable; ``on_sample`` is set by it)."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.on_sample = None
        self._scorer = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "on_sample": None, "_scorer": None}  # each process loads its own model

    def scorer(self):
        """The release's scorer, loaded once per process (pretrain.scorer, named: this layer sits below it)."""
        if self.cfg.scorer and self._scorer is None:
            import importlib

            module = importlib.import_module(SCORER.partition(":")[0])
            self._scorer = getattr(module, SCORER.partition(":")[2])(self.cfg.scorer, self.cfg.members,
                                                                     self.cfg.scorer_batch_size, self.cfg.open_clip_model)
        return self._scorer

    def __call__(self, task: ScanTask) -> dict:
        try:
            table = scan_shard(task, self.cfg, self.on_sample or (lambda success: None), self.scorer())
        except ShardError as err:
            raise ValueError(f"{err.reason}: {err.detail}") from None
        write_table(task.out, table)
        return {"shard": posixpath.basename(task.shard.url), "samples": table.num_rows}


def write_table(url: str, table: pa.Table) -> None:
    """``table`` as one parquet file at ``url`` (local or object store), written atomically."""
    import pyarrow.parquet as pq

    from mmfuse.storage import filesystem, write_bytes

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs, path = filesystem(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_bytes(fs, path, buffer.getvalue())


def read_table(url: str) -> pa.Table:
    import pyarrow.parquet as pq

    from mmfuse.storage import filesystem

    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)

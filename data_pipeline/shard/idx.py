"""IDX files (MNIST, Fashion-MNIST, KMNIST and kin) → PNG images, ``manifest.parquet`` and ``classes.json``.

The output folder is what ``mmfuse shard`` reads (``input.path=DIR/manifest.parquet``): one row per image with its
relative path, a caption made from a template and the class name, and the ``label`` / ``label_name`` task fields
that zero-shot evaluation takes its class names from::

    python -m data_pipeline.shard.idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz \\
        --classes "T-shirt/top,Trouser,..." --caption "a photo of a {}." --output raw/train [--limit N]

IDX (LeCun's format): two zero bytes, a type code (0x08 = unsigned byte, the only one these datasets use), the
number of dimensions, one big-endian uint32 per dimension, then the values. Input is checked strictly: a wrong
magic number, a header whose sizes the file cannot hold, a truncated or over-long payload, image and label counts
that disagree, or a label outside the class list is a ``ValueError`` naming the file, which the CLI prints as one
line. Nothing is allocated from a header's claims before they are checked against the file's real length.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline.synth import _write_atomic

UNSIGNED_BYTE = 0x08
IMAGES_NDIM, LABELS_NDIM = 3, 1
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand one compressed byte into more than ~1032 (zlib's tech notes)
CHUNK = 1 << 20
MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("text", pa.string()),
                             ("label", pa.int64()), ("label_name", pa.string())])


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The array in an IDX file (``.gz`` or raw) of unsigned bytes with ``ndim`` dimensions."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    size = path.stat().st_size
    gzipped = path.name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4:
                raise ValueError(f"{path}: truncated: {len(head)} bytes, shorter than the 4-byte IDX magic number")
            if head[:2] != b"\0\0" or head[2] != UNSIGNED_BYTE or head[3] != ndim:
                raise ValueError(f"{path}: bad magic number 0x{head.hex()}: expected 0x0000{UNSIGNED_BYTE:02x}{ndim:02x} "
                                 f"(IDX, unsigned bytes, {ndim} dimension{'s' * (ndim > 1)})")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise ValueError(f"{path}: truncated: the header ends inside its {ndim} dimension sizes")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            expected = int(np.prod(dims, dtype=object))
            # A header is only a claim: check it against what the file can hold before reading or allocating.
            capacity = size * DEFLATE_MAX_RATIO if gzipped else size - 4 - 4 * ndim
            if expected > capacity:
                shown = "x".join(map(str, dims))
                raise ValueError(f"{path}: truncated or corrupt: the header claims {shown} = {expected} bytes of data, "
                                 f"more than a {size}-byte file can hold")
            data = _read_exactly(f, expected, path)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; a cut gzip stream an EOFError
        raise ValueError(f"{path}: unreadable{' gzip' if gzipped else ''} file: {err}") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _read_exactly(f, expected: int, path: Path) -> bytes:
    """``expected`` bytes, read in chunks (memory follows the real data, not the header), and nothing after them."""
    buffer = bytearray()
    while len(buffer) < expected:
        chunk = f.read(min(CHUNK, expected - len(buffer)))
        if not chunk:
            raise ValueError(f"{path}: truncated: {len(buffer)} of the {expected} data bytes the header promises")
        buffer += chunk
    if f.read(1):
        raise ValueError(f"{path}: trailing data after the {expected} bytes the header describes")
    return bytes(buffer)


def read_dataset(images: str | Path, labels: str | Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, rows, cols]`` uint8 images and ``[N]`` labels, checked against each other and the class count."""
    pixels = read_idx(images, IMAGES_NDIM)
    targets = read_idx(labels, LABELS_NDIM)
    if len(pixels) != len(targets):
        raise ValueError(f"{labels}: {len(targets)} labels for the {len(pixels)} images in {images}")
    bad = np.flatnonzero(targets >= num_classes)
    if bad.size:
        raise ValueError(f"{labels}: label {int(targets[bad[0]])} at index {int(bad[0])} is out of range for "
                         f"{num_classes} classes ({bad.size} such label{'s' * (bad.size > 1)})")
    return pixels, targets


def convert(images: str | Path, labels: str | Path, classes: list[str], caption: str, output: str | Path,
            limit: int = 0) -> Path:
    """Write ``output``/images/NNNNNN.png, classes.json and, last, manifest.parquet; return the manifest path."""
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"class names must be non-empty and distinct, got {classes}")
    try:
        caption.format(classes[0])
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(f"caption template {caption!r} must hold one {{}} for the class name ({err})") from None
    pixels, targets = read_dataset(images, labels, len(classes))
    if limit:
        pixels, targets = pixels[:limit], targets[:limit]
    out = Path(output).expanduser()
    manifest = out / "manifest.parquet"
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # the manifest marks a finished folder: gone first, back last
    width = max(6, len(str(len(pixels) - 1)))
    rows = []
    for index, (image, label) in enumerate(zip(pixels, targets)):
        key = f"{index:0{width}d}"
        Image.fromarray(image).save(out / "images" / f"{key}.png", optimize=False)
        name = classes[int(label)]
        rows.append({"id": key, "image": f"images/{key}.png", "text": caption.format(name), "label": int(label),
                     "label_name": name})
    for stale in (out / "images").glob("*.png"):  # left by an earlier, larger conversion into the same folder
        if not stale.stem.isdigit() or int(stale.stem) >= len(pixels):
            stale.unlink()
    _write_atomic(out / "classes.json", json.dumps(classes, indent=1).encode())
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buffer)
    _write_atomic(manifest, buffer.getvalue().to_pybytes())
    return manifest


def parse_classes(value: str) -> list[str]:
    """A JSON list file, a text file with one name per line, or the names comma-separated."""
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        names = json.loads(text) if path.suffix == ".json" else text.splitlines()
    else:
        names = value.split(",")
    return [str(name).strip() for name in names if str(name).strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.shard.idx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="IDX image file (idx3-ubyte, optionally .gz)")
    parser.add_argument("--labels", required=True, help="IDX label file (idx1-ubyte, optionally .gz)")
    parser.add_argument("--classes", required=True,
                        help="class names in label order: comma-separated, or a .json list / one-per-line text file")
    parser.add_argument("--caption", default="a photo of a {}.", help="caption template; {} is the class name")
    parser.add_argument("--output", required=True, help="folder for images/, classes.json and manifest.parquet")
    parser.add_argument("--limit", type=int, default=0, help="convert only the first N samples (0: all)")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error("--limit must be >= 0")
    try:
        manifest = convert(args.images, args.labels, parse_classes(args.classes), args.caption, args.output, args.limit)
    except ValueError as err:
        print(f"data_pipeline.shard.idx: error: {err}", file=sys.stderr)
        return 1
    rows = pq.read_metadata(manifest).num_rows
    print(f"{manifest}: {rows} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())

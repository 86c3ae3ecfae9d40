"""Small deterministic test inputs: photo-like JPEGs, tones, and the bad-input zoo."""

from __future__ import annotations

import io
import os
import struct
import zlib
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([127 + 100 * np.sin(x / (20 + 10 * k) + y / 37 + phase[k]) for k in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **kwargs)
    return out.getvalue()


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


def tone(freq: float, seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def good_rows(root: Path, count: int, seed: int = 0, audio_every: int = 3) -> list[dict]:
    """``count`` valid samples: image + caption, and audio on every ``audio_every``-th."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"files/good{seed}_{i}"
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(photo(160 + 8 * i, 120, seed * 1000 + i)))
        row = {"image": f"{name}.jpg", "text": f"good sample {seed}-{i}".encode(), "audio": None}
        if i % audio_every == 0:
            (root / f"{name}.wav").write_bytes(wav_bytes(tone(220 + 20 * i)))
            row["audio"] = f"{name}.wav"
        rows.append(row)
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    schema = pa.schema([("image", pa.string()), ("text", pa.binary()), ("audio", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# reason → how many rows of the zoo fail with it (sharding with the default guards)
BAD_REASONS = {
    "image_truncated": 1,
    "image_decode_error": 2,
    "not_an_image": 1,
    "empty_file": 1,
    "image_too_large": 1,
    "bad_aspect_ratio": 4,
    "image_too_small": 1,
    "text_empty": 3,
    "text_not_utf8": 1,
    "text_too_long": 1,
    "audio_empty": 1,
    "audio_decode_error": 1,
    "audio_nan": 1,
    "duplicate": 2,
    "file_not_found": 1,
    "not_a_file": 3,
    "bad_path": 1,
}
# the good row whose caption carries NULs and escapes: kept, stripped, counted in the stats' "cleaned"
DIRTY_CAPTION = b"\x00a \x1b[1mred\x1b[0m kite\x07\x00\x00"


def bad_input_zoo(root: Path) -> tuple[list[dict], list[dict]]:
    """44 rows of 38 kinds: good samples mixed with every kind of bad input (BAD_REASONS) and with odd but valid
    ones that must be converted, not lost. Returns (all rows, the good rows alone)."""
    files = root / "files"
    good = good_rows(root, 6)
    files.mkdir(parents=True, exist_ok=True)
    full = jpeg_bytes(photo(400, 300, 99))
    blobs = {
        "truncated.jpg": full[: len(full) // 2],
        "corrupt.jpg": full[:600] + bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)),
        "html.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "empty.jpg": b"",
        "bomb.png": bomb_png(),
        "cmyk.jpg": jpeg_bytes(photo(200, 150, 5).convert("CMYK")),
        "rotated.jpg": rotated_jpeg(),
        "empty.wav": wav_bytes(np.zeros(0, np.float32)),
        "broken.wav": b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunkjunk" + b"\x01" * 64,
        "nan.wav": wav_bytes(np.full(800, np.nan, np.float32)),
        # Extreme aspect ratios: resized to a 256 short side, 468x1 is 119808x256, more than JPEG can hold.
        "banner.png": _encoded(Image.new("RGB", (468, 1), (200, 30, 30)), "PNG"),
        "tower.png": _encoded(Image.new("RGB", (1, 468), (30, 200, 30)), "PNG"),
        "strip.png": _encoded(Image.new("L", (20000, 1), 128), "PNG"),
        "strip80m.png": bomb_png(80_000_000, 1),  # under the pixel limit; resizing it overflowed
        "pixel.gif": _encoded(Image.new("P", (1, 1)), "GIF"),  # a tracking pixel
        "badzlib.png": _broken_zlib_png(),
        # Odd but valid: converted to RGB, kept.
        "palette_alpha.png": palette_with_transparency(),
        "animated.gif": animated_gif(),
        "rgba.png": _encoded(photo(120, 90, 11).convert("RGBA"), "PNG"),
        "bilevel.png": _encoded(photo(64, 48, 12).convert("1"), "PNG"),
        "wide19.jpg": jpeg_bytes(photo(380, 20, 13)),  # 19:1, just under the aspect guard
        "photo.webp": _encoded(photo(100, 80, 14), "WEBP"),
        "progressive.jpg": jpeg_bytes(photo(150, 100, 15), progressive=True),
        "grey16.tif": _encoded(Image.fromarray(np.tile(np.linspace(0, 65535, 90), (60, 1)).astype(np.uint16)), "TIFF"),
        "dirty.jpg": jpeg_bytes(photo(130, 100, 16)),
    }
    deep = (np.tile(np.linspace(0, 65535, 200), (150, 1))).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(deep).save(out, format="PNG")
    blobs["deep16.png"] = out.getvalue()
    for name, data in blobs.items():
        (files / name).write_bytes(data)
    # Not files: a folder, a named pipe (open() would block forever), a device.
    (files / "folder.jpg").mkdir(exist_ok=True)
    if not (files / "pipe.jpg").exists():
        os.mkfifo(files / "pipe.jpg")
    # Three more good samples that stress decoding: CMYK, 16-bit greyscale, EXIF-rotated.
    tricky = [
        {"image": "files/cmyk.jpg", "text": b"a cmyk photo", "audio": None},
        {"image": "files/deep16.png", "text": b"a 16-bit grey ramp", "audio": None},
        {"image": "files/rotated.jpg", "text": b"a rotated photo", "audio": None},
    ]
    odd = [
        {"image": f"files/{name}", "text": f"odd but valid {name}".encode(), "audio": None}
        for name in ("palette_alpha.png", "animated.gif", "rgba.png", "bilevel.png", "wide19.jpg", "photo.webp",
                     "progressive.jpg", "grey16.tif")
    ] + [{"image": "files/dirty.jpg", "text": DIRTY_CAPTION, "audio": None}]
    good_image = good[1]["image"]
    bad = [
        {"image": "files/truncated.jpg", "text": b"truncated", "audio": None},
        {"image": "files/corrupt.jpg", "text": b"corrupt", "audio": None},
        {"image": "files/html.jpg", "text": b"html page", "audio": None},
        {"image": "files/empty.jpg", "text": b"zero bytes", "audio": None},
        {"image": "files/bomb.png", "text": b"bomb", "audio": None},
        {"image": "files/missing.jpg", "text": b"gone", "audio": None},
        {"image": good_image, "text": b"", "audio": None},
        {"image": good_image, "text": b"  \t\n  ", "audio": None},
        {"image": good_image, "text": b"caf\xe9 latin-1", "audio": None},
        {"image": good_image, "text": b"long " * 1000, "audio": None},
        {"image": None, "text": b"empty audio", "audio": "files/empty.wav"},
        {"image": None, "text": b"broken audio", "audio": "files/broken.wav"},
        {"image": None, "text": b"nan audio", "audio": "files/nan.wav"},
    ]
    worse = [
        {"image": "files/banner.png", "text": b"468x1 banner", "audio": None},
        {"image": "files/tower.png", "text": b"1x468 tower", "audio": None},
        {"image": "files/strip.png", "text": b"20000x1 strip", "audio": None},
        {"image": "files/strip80m.png", "text": b"80000000x1 strip", "audio": None},
        {"image": "files/pixel.gif", "text": b"tracking pixel", "audio": None},
        {"image": "files/badzlib.png", "text": b"png with a broken zlib stream", "audio": None},
        {"image": "files/folder.jpg", "text": b"a folder", "audio": None},
        {"image": "files/pipe.jpg", "text": b"a named pipe", "audio": None},
        {"image": "/dev/null", "text": b"a device", "audio": None},
        {"image": "files/nul\0byte.jpg", "text": b"a NUL in the path", "audio": None},
        {"image": good_image, "text": b"\x00\x01\x1b\x7f", "audio": None},  # nothing left once stripped
    ]
    rows = [good[0], bad[0], good[1], *bad[1:5], good[2], *tricky, *bad[5:9], good[3], good[0], *bad[9:], good[4], good[2], good[5]]
    rows += [row for pair in zip_longest(worse, odd) for row in pair if row is not None]
    return rows, good + tricky + odd


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _broken_zlib_png() -> bytes:
    data = bytearray(_encoded(photo(64, 64, 17), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 4 : idat + 6] = b"\0\0"  # no valid zlib header: "broken data stream" while decoding
    return bytes(data)


def palette_with_transparency() -> bytes:
    image = photo(96, 64, 18).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encoded(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [photo(80, 60, 19 + k).convert("P", palette=Image.Palette.ADAPTIVE) for k in range(3)]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(photo(240, 120, 7), exif=exif.tobytes())

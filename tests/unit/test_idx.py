"""IDX → PNG + manifest: the outputs, and one clear error per kind of bad input."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.shard import idx

CLASSES = ["zero", "one", "two"]
IMAGES = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2) * 10  # 4 images of 3 rows x 2 columns
LABELS = np.array([2, 0, 1, 2], dtype=np.uint8)


def idx_bytes(array: np.ndarray, magic: bytes | None = None, dims: tuple[int, ...] | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    magic = bytes([0, 0, 0x08, len(dims)]) if magic is None else magic
    return magic + struct.pack(f">{len(dims)}I", *dims) + array.tobytes()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    return (write(tmp_path / "images-idx3-ubyte.gz", idx_bytes(IMAGES)),
            write(tmp_path / "labels-idx1-ubyte.gz", idx_bytes(LABELS)))


def test_converts_to_pngs_manifest_and_classes(files, tmp_path):
    out = tmp_path / "out"
    manifest = idx.convert(*files, CLASSES, "a photo of a {}.", out)
    rows = pq.read_table(manifest).to_pylist()
    assert [r["label"] for r in rows] == LABELS.tolist()
    assert rows[0] == {"id": "000000", "image": "images/000000.png", "text": "a photo of a two.", "label": 2,
                       "label_name": "two"}
    for i, row in enumerate(rows):
        with Image.open(out / row["image"]) as image:
            assert image.mode == "L" and image.size == (2, 3)  # PIL sizes are (width, height)
            assert np.array_equal(np.asarray(image), IMAGES[i])
    assert json.loads((out / "classes.json").read_text()) == CLASSES


def test_raw_files_limit_and_stale_images(tmp_path):
    images = write(tmp_path / "images-idx3-ubyte", idx_bytes(IMAGES))
    labels = write(tmp_path / "labels-idx1-ubyte", idx_bytes(LABELS))
    out = tmp_path / "out"
    idx.convert(images, labels, CLASSES, "{}", out)
    manifest = idx.convert(images, labels, CLASSES, "{}", out, limit=2)
    assert pq.read_table(manifest).column("text").to_pylist() == ["two", "zero"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]


def test_cli_success_and_one_line_error(files, tmp_path, capsys):
    images, labels = files
    classes = tmp_path / "classes.txt"
    classes.write_text("zero\none\ntwo\n")
    out = tmp_path / "out"
    assert idx.main(["--images", str(images), "--labels", str(labels), "--classes", str(classes),
                     "--output", str(out), "--limit", "3"]) == 0
    assert pq.read_table(out / "manifest.parquet").column("text").to_pylist() == [
        "a photo of a two.", "a photo of a zero.", "a photo of a one."]
    capsys.readouterr()
    assert idx.main(["--images", str(labels), "--labels", str(labels), "--classes", "a,b,c", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad magic number" in err and str(labels) in err


def _error(tmp_path, images: bytes, labels: bytes, classes=CLASSES) -> str:
    paths = write(tmp_path / "i.gz", images), write(tmp_path / "l.gz", labels)
    with pytest.raises(ValueError) as info:
        idx.convert(*paths, classes, "{}", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    return str(info.value)


def test_bad_magic_number(tmp_path):
    message = _error(tmp_path, idx_bytes(IMAGES, magic=b"\x00\x00\x09\x03"), idx_bytes(LABELS))
    assert "i.gz: bad magic number 0x00000903" in message


def test_images_passed_as_labels(tmp_path):
    assert "l.gz: bad magic number 0x00000803" in _error(tmp_path, idx_bytes(IMAGES), idx_bytes(IMAGES))


def test_count_mismatch(tmp_path):
    assert "l.gz: 3 labels for the 4 images" in _error(tmp_path, idx_bytes(IMAGES), idx_bytes(LABELS[:3]))


def test_truncated_payload(tmp_path):
    message = _error(tmp_path, idx_bytes(IMAGES)[:-5], idx_bytes(LABELS))
    assert "i.gz: truncated: 19 of the 24 data bytes" in message


def test_truncated_header(tmp_path):
    assert "i.gz: truncated" in _error(tmp_path, idx_bytes(IMAGES)[:10], idx_bytes(LABELS))


def test_trailing_data(tmp_path):
    assert "l.gz: trailing data" in _error(tmp_path, idx_bytes(IMAGES), idx_bytes(LABELS) + b"\x01")


def test_cut_gzip_stream(tmp_path):
    path = tmp_path / "i.gz"
    path.write_bytes(gzip.compress(idx_bytes(IMAGES))[:-12])
    with pytest.raises(ValueError, match="i.gz: unreadable gzip file"):
        idx.read_idx(path, 3)


def test_not_gzip(tmp_path):
    path = tmp_path / "i.gz"
    path.write_bytes(idx_bytes(IMAGES))
    with pytest.raises(ValueError, match="i.gz: unreadable gzip file"):
        idx.read_idx(path, 3)


def test_label_out_of_range(tmp_path):
    labels = np.array([0, 1, 7, 3], dtype=np.uint8)
    assert "l.gz: label 7 at index 2 is out of range for 3 classes (2 such labels)" in _error(
        tmp_path, idx_bytes(IMAGES), idx_bytes(labels))


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_huge_header_count_refused_before_reading(tmp_path, monkeypatch, suffix):
    # 4 billion images of 64 KiB claimed by a tiny file: refused from the file size, nothing read or allocated.
    path = write(tmp_path / f"i{suffix}", idx_bytes(IMAGES, dims=(2**32 - 1, 256, 256)))
    monkeypatch.setattr(idx, "_read_exactly", lambda *a: pytest.fail("read the payload of an impossible header"))
    with pytest.raises(ValueError, match=r"claims 4294967295x256x256 = \d+ bytes of data, more than a \d+-byte file"):
        idx.read_idx(path, 3)


def test_bad_classes_and_caption(files, tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        idx.convert(*files, ["a", "a", "b"], "{}", tmp_path / "out")
    with pytest.raises(ValueError, match="one {} for the class name"):
        idx.convert(*files, CLASSES, "a photo of a {name}", tmp_path / "out")


def test_missing_file(files, tmp_path):
    with pytest.raises(ValueError, match="nope.gz: no such file"):
        idx.convert(tmp_path / "nope.gz", files[1], CLASSES, "{}", tmp_path / "out")

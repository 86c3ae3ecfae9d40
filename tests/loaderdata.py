"""Hand-built WebDataset shards for loader tests: small, fast, and breakable on purpose."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    return out.getvalue()


def flac(seed: int, seconds: float = 0.25, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, 0.3 * np.sin(2 * np.pi * (200 + seed) * t), rate, format="FLAC")
    return out.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def sample(key: str, seed: int, audio: bool = False, label: int | None = None) -> dict[str, bytes]:
    out = {"__key__": key, "jpg": jpeg(seed), "txt": f"caption {key}".encode()}
    meta = {"label": label if label is not None else seed % 5}
    out["json"] = json.dumps(meta).encode()
    if audio:
        out["flac"] = flac(seed)
    return out


def make_dataset(root: Path, shards: int, per_shard: int, prefix: str = "shard", audio_every: int = 0,
                 counts: list[int] | None = None) -> Path:
    """``shards`` tars of ``per_shard`` samples (or ``counts[i]``) plus sizes.json; keys are unique per prefix."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(shards):
        n = counts[s] if counts else per_shard
        items = [sample(f"{prefix}{s:03d}{i:04d}", s * 1000 + i, audio=bool(audio_every) and i % audio_every == 0) for i in range(n)]
        name = f"{prefix}-{s:06d}.tar"
        write_tar(root / name, items)
        sizes[name] = n
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root

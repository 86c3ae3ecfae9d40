"""Audio processing: bytes (wav/flac/ogg/mp3) → mono, resampled, clipped (or padded) FLAC.

Only as many frames as the clip can keep are decoded, so a header that claims hours of audio costs nothing.
Resampling uses soxr (a proper band-limited resampler, not linear interpolation).
"""

from __future__ import annotations

import io
import math

import numpy as np
import soundfile as sf
import soxr

from data_pipeline.config import AudioConfig
from data_pipeline.errors import SampleError, sample_step


def process_audio(data: bytes, cfg: AudioConfig) -> tuple[bytes, dict]:
    """Returns FLAC bytes (16-bit, mono, ``cfg.sample_rate``) and metadata; raises SampleError on bad audio."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            source_rate = f.samplerate
            keep = math.ceil(cfg.max_seconds * source_rate)
            samples = f.read(frames=keep, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile, RuntimeError, TypeError, ValueError, EOFError, MemoryError for odd headers
        raise SampleError("audio_decode_error", str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    if samples.size == 0:
        raise SampleError("audio_empty")
    if not np.isfinite(samples).all():
        raise SampleError("audio_nan")
    mono = samples.mean(axis=1)
    if source_rate != cfg.sample_rate:
        with sample_step("audio_resample_error"):
            mono = soxr.resample(mono, source_rate, cfg.sample_rate).astype(np.float32)
    max_frames = int(round(cfg.max_seconds * cfg.sample_rate))
    mono = mono[:max_frames]
    if cfg.pad and len(mono) < max_frames:
        mono = np.pad(mono, (0, max_frames - len(mono)))
    out = io.BytesIO()
    with sample_step("audio_encode_error"):
        sf.write(out, np.clip(mono, -1.0, 1.0), cfg.sample_rate, format="FLAC", subtype="PCM_16")
    meta = {
        "audio_sample_rate": cfg.sample_rate,
        "audio_seconds": round(len(mono) / cfg.sample_rate, 4),
        "original_sample_rate": source_rate,
        "original_channels": samples.shape[1],
    }
    return out.getvalue(), meta

import io

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.audio import process_audio
from data_pipeline.config import AudioConfig, TextConfig
from data_pipeline.errors import SampleError
from data_pipeline.text import process_text


def wav(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def tone(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([mono] * channels, -1) if channels > 1 else mono


def decode(data: bytes):
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def test_resample_to_mono_keeps_pitch():
    data, meta = process_audio(wav(tone(440, 44100, 1.0, channels=2), 44100), AudioConfig(sample_rate=16000))
    samples, rate = decode(data)
    assert rate == 16000 and samples.ndim == 1 and len(samples) == 16000
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * rate / len(samples) - 440) < 2
    assert meta["original_sample_rate"] == 44100 and meta["original_channels"] == 2
    assert data.startswith(b"fLaC")


def test_clip_and_pad():
    clipped, meta = process_audio(wav(tone(300, 16000, 5.0), 16000), AudioConfig(max_seconds=2.0))
    assert len(decode(clipped)[0]) == 32000 and meta["audio_seconds"] == 2.0
    padded, _ = process_audio(wav(tone(300, 16000, 0.5), 16000), AudioConfig(max_seconds=2.0, pad=True))
    samples = decode(padded)[0]
    assert len(samples) == 32000 and np.abs(samples[-8000:]).max() == 0


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_other_containers(fmt):
    subtype = "VORBIS" if fmt == "OGG" else "PCM_16"
    data, meta = process_audio(wav(tone(500, 22050, 1.0), 22050, fmt, subtype), AudioConfig(sample_rate=16000))
    assert meta["audio_seconds"] == pytest.approx(1.0, abs=0.01)


def test_zero_length_nan_and_broken_header():
    with pytest.raises(SampleError) as err:
        process_audio(wav(np.zeros(0, np.float32), 16000), AudioConfig())
    assert err.value.reason == "audio_empty"
    nan = tone(440, 16000, 0.2)
    nan[100] = np.nan
    with pytest.raises(SampleError) as err:
        process_audio(wav(nan, 16000), AudioConfig())
    assert err.value.reason == "audio_nan"
    broken = bytearray(wav(tone(440, 16000, 0.2), 16000))
    broken[8:16] = b"XXXXXXXX"  # "WAVEfmt " → garbage
    with pytest.raises(SampleError) as err:
        process_audio(bytes(broken), AudioConfig())
    assert err.value.reason == "audio_decode_error"


@pytest.mark.parametrize("value, expected, stripped", [
    ("  two red   circles\n", "two red circles", 0),
    (b"a \xc3\xa9t\xc3\xa9 photo", "a été photo", 0),
    ("cafe\u0301", "café", 0),
    (b"a red\x00 car\x00\x00", "a red car", 3),  # C-string padding
    ("\x1b[1mbold\x1b[0m \x07bell\x7f \x9bC1", "[1mbold[0m bell C1", 5),
])
def test_text_normalised(value, expected, stripped):
    assert process_text(value, TextConfig()) == (expected, stripped)


@pytest.mark.parametrize("value, reason", [
    ("", "text_empty"),
    (" \t\n ", "text_empty"),
    (b"\xff\xfe bad", "text_not_utf8"),
    ("x" * 3000, "text_too_long"),
    (12, "text_not_a_string"),
    ("\x00\x01\x02 \x7f", "text_empty"),  # nothing left once the control characters go
])
def test_text_failures(value, reason):
    with pytest.raises(SampleError) as err:
        process_text(value, TextConfig())
    assert err.value.reason == reason

"""Log-mel spectrograms of fixed shape, in torch (torchaudio's wheels do not pair with the torch used here).

HTK mel scale, triangular filters, power spectrum, natural log with a floor. Output ``[n_mels, frames]`` plus a
``[frames]`` mask that is True where the clip had signal (padding frames are False). Padding and SpecAugment's
masks both hold ``FLOOR``, the log of silence.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from data_pipeline.config import AudioFeatureConfig, SpecAugmentConfig

FLOOR = math.log(1e-10)


def hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, evenly spaced on the mel scale."""
    f_max = f_max or sample_rate / 2
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (center - lower)
    falling = (upper - bins[None]) / (upper - center)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0, None).astype(np.float32))


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft)


def log_mel(waveform: np.ndarray, cfg: AudioFeatureConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mono float waveform at ``cfg.sample_rate`` → (log-mel ``[n_mels, frames]``, valid mask ``[frames]``)."""
    signal = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    needed = (cfg.frames - 1) * cfg.hop_length + 1
    signal = signal[: needed + cfg.n_fft]
    valid = min(cfg.frames, max(1, math.ceil(len(signal) / cfg.hop_length)))
    if len(signal) < cfg.n_fft:
        signal = torch.nn.functional.pad(signal, (0, cfg.n_fft - len(signal)))
    spectrum = torch.stft(signal, cfg.n_fft, cfg.hop_length, window=_hann(cfg.n_fft), center=True, return_complex=True)
    power = torch.view_as_real(spectrum).square().sum(-1)  # |z|^2 without |z|'s square root
    mel = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max) @ power
    mel = torch.log(mel.clamp_min(1e-10))[:, : cfg.frames]
    out = torch.full((cfg.n_mels, cfg.frames), FLOOR)
    out[:, :valid] = mel[:, :valid]
    mask = torch.zeros(cfg.frames, dtype=torch.bool)
    mask[:valid] = True
    return out, mask


def spec_augment(mel: torch.Tensor, cfg: SpecAugmentConfig) -> torch.Tensor:
    """``mel`` (``[n_mels, frames]``) with ``cfg.freq_masks`` bands of mel bins and ``cfg.time_masks`` runs of
    frames set to ``FLOOR``, in place. Widths and positions come from torch's default generator, which the loaders
    seed per sample from (seed, epoch, sample): the same masks after a resume."""
    for _ in range(cfg.freq_masks):
        _mask_band(mel, 0, cfg.freq_width)
    for _ in range(cfg.time_masks):
        _mask_band(mel, 1, cfg.time_width)
    return mel


def _mask_band(mel: torch.Tensor, dim: int, max_width: int) -> None:
    size = mel.shape[dim]
    width = int(torch.randint(0, min(max_width, size) + 1, ()))
    start = int(torch.randint(0, size - width + 1, ()))
    mel.narrow(dim, start, width).fill_(FLOOR)

"""Raw tar members → model inputs, and samples → batches with a presence mask per modality.

The image transform and the tokenizer come from the model (open_clip's ``image_transform`` and tokenizer), so
train augmentation vs eval is the caller's choice; so is ``Decoder.train`` for audio: a random window of a long clip
(and SpecAugment when configured) for training, every window (up to ``eval_windows``) for evaluation, where a batch
carries the windows after each clip's first as ``audio_more`` (``[W, n_mels, frames]``) with the batch row each
belongs to in ``audio_more_owner`` (``[W]``). A sample missing a modality keeps a zero tensor and a False in that
modality's mask; a sample that fails to decode raises ``SampleError`` with its reason.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import soundfile as sf
import soxr
import torch
from PIL import Image

from data_pipeline.loader.batchring import fresh_shared
from data_pipeline.config import AudioFeatureConfig, LoaderConfig, extensions
from data_pipeline.errors import SampleError, sample_step
from data_pipeline.image import decode_jpeg_fast, to_rgb, upright_transpose
from data_pipeline.loader.melspec import log_mel, spec_augment
from data_pipeline.loader.tarstream import RawSample
from data_pipeline.text import strip_control

MODALITIES = ("image", "text", "audio")
# Batch tensors that are all zeros when no sample of the batch has the modality: ``collate`` zero-fills missing
# rows, so the trainer makes such tensors on the device instead of copying them (pretrain.step.batch_to_device).
ZERO_WHEN_ABSENT = {"image": "has_image", "audio": "has_audio", "audio_mask": "has_audio"}


@dataclass
class Decoder:
    """Picklable: the config plus the model's transform and tokenizer, applied in each loader worker."""

    cfg: LoaderConfig
    image_transform: Callable[[Image.Image], torch.Tensor] | None
    tokenizer: Callable[[list[str]], torch.Tensor] | None
    image_size: int = 224
    train: bool = True
    """Audio: a random window of a long clip and SpecAugment (training), or all its windows (evaluation); text: one
    of the sample's alternative captions (``members.text_choices_json_field``), or always the caption member."""

    def __post_init__(self) -> None:
        members = self.cfg.members
        self.image_exts = extensions(members.image)
        self.text_exts = extensions(members.text)
        self.audio_exts = extensions(members.audio)
        self.wanted = {*self.image_exts, *self.text_exts, *self.audio_exts, members.json}
        self._head, self._normalize = split_tensor_tail(self.image_transform)

    def __call__(self, raw: RawSample) -> dict[str, Any]:
        members, cfg = raw.members, self.cfg
        meta = _json(members.get(cfg.members.json))
        image_bytes = _first(members, self.image_exts)
        text = _first(members, self.text_exts)
        caption = text.decode("utf-8", "replace") if text is not None else meta.get(cfg.members.text_json_field)
        alternatives = meta.get(cfg.members.text_choices_json_field) if cfg.members.text_choices_json_field else None
        if isinstance(caption, list):  # LAION-CLAP's json keeps a list of captions: the first, and the rest to draw from
            alternatives = caption + (alternatives if isinstance(alternatives, list) else [])
            caption = next((c for c in caption if isinstance(c, str) and c.strip()), None)
        if isinstance(caption, str):
            caption = strip_control(caption).strip()  # shards made elsewhere may hold NULs and escapes
        audio_bytes = _first(members, self.audio_exts)
        sample: dict[str, Any] = {"__key__": raw.key, "meta": meta}
        present = {"image": image_bytes is not None, "text": isinstance(caption, str) and bool(caption), "audio": audio_bytes is not None}
        for modality in cfg.require:
            if not present[modality]:
                raise SampleError(f"missing_{modality}")
        if not any(present.values()):
            raise SampleError("no_modality", "no configured member found")
        if present["image"]:
            sample["image"] = self.decode_image(image_bytes)
        if present["text"]:
            sample["text"] = caption
        if present["audio"]:
            sample.update(self.decode_clip(audio_bytes))
        if present["text"] and self.train and cfg.members.text_choices_json_field:
            sample["text"] = _draw_caption(caption, alternatives)
        return sample

    def decode_clip(self, data: bytes) -> dict[str, Any]:
        """``{"audio": (log-mel, mask)}`` of the clip's (first or training) window, and at evaluation
        ``"audio_more"``: the log-mels of its other windows."""
        with sample_step("audio_decode_error"):  # the log-mel and resampling of an odd clip fail it alone
            windows = decode_audio(data, self.cfg.audio, self.train)
        out: dict[str, Any] = {"audio": windows[0]}
        if len(windows) > 1:
            out["audio_more"] = [mel for mel, _ in windows[1:]]
        return out

    def decode_image(self, data: bytes) -> torch.Tensor:
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > self.cfg.max_image_pixels:
                raise SampleError("image_too_large", f"{width}x{height}")
            limit = self.cfg.max_image_aspect_ratio
            if limit and max(width, height) > limit * max(1, min(width, height)):
                raise SampleError("bad_aspect_ratio", f"{width}x{height}")
            # TurboJPEG through simplejpeg: the same pixels as Pillow's decoder, ~30% less time (anything it
            # refuses, truncated data included, goes through Pillow, which decides the failure reason).
            decoded = decode_jpeg_fast(data, None) if image.format == "JPEG" and image.mode in ("RGB", "L") else None
            if decoded is None:
                image.load()  # decode errors are raised here, not later in the transform
            # Raw files (fine-tuning's COCO, VQA and folder readers) may carry an EXIF rotation; shards made here
            # are stored upright, without EXIF, and pay one dict lookup.
            transpose = upright_transpose(image) if "exif" in image.info else None
            image = decoded if decoded is not None else to_rgb(image)  # 16-bit, CMYK, palette + alpha included
            if transpose is not None:
                image = image.transpose(transpose)
        except SampleError:
            raise
        except Image.DecompressionBombError as err:  # Pillow's own limit (twice its default) tripped at open
            raise SampleError("image_too_large", str(err)[:100]) from None
        except Exception as err:  # Pillow raises many types for corrupt data
            raise SampleError("image_decode_error", type(err).__name__) from None
        with sample_step("image_transform_error"):  # the model's resize and crop, on this image's odd size
            return self._transform(image)

    def _transform(self, image: Image.Image) -> torch.Tensor:
        if self.image_transform is None:
            return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        if self._normalize is None:
            return self.image_transform(image)
        image = self._head(image)
        if isinstance(image, Image.Image) and image.mode == "RGB":
            return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8: collate converts the whole batch
        return self._normalize.tail(image)

    def collate(self, samples: list[dict], empty: Callable[..., torch.Tensor] | None = None) -> dict[str, Any]:
        """Stack into a batch; missing modalities are zeros with False in ``has_<modality>``.

        ``empty(size, dtype)`` allocates the batch tensors (a worker's ``WorkerRing.empty``); by default, shared
        memory in a loader worker, ordinary memory elsewhere."""
        empty = empty or _empty_batch
        n = len(samples)
        batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
        for modality in MODALITIES:
            batch[f"has_{modality}"] = torch.tensor([modality in s for s in samples], dtype=torch.bool)
        images = [s.get("image") for s in samples]
        first = next((x for x in images if x is not None), None)
        shape, dtype = (first.shape, first.dtype) if first is not None else ((3, self.image_size, self.image_size), torch.float32)
        if self._normalize is not None:
            batch["image"] = self._normalize.collate(images, (3, *shape[1:]) if first is not None else shape, empty)
        else:
            batch["image"] = _stack_or_zeros(images, shape, dtype, empty)
        captions = [s.get("text", "") for s in samples]
        batch["caption"] = captions
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(captions) if n else torch.zeros(0, getattr(self.tokenizer, "context_length", 77), dtype=torch.long)
        audio_cfg = self.cfg.audio
        mel_shape = (audio_cfg.n_mels, audio_cfg.frames)
        batch["audio"] = _stack_or_zeros([s["audio"][0] if "audio" in s else None for s in samples], mel_shape, torch.float32, empty)
        batch["audio_mask"] = _stack_or_zeros([s["audio"][1] if "audio" in s else None for s in samples], (audio_cfg.frames,), torch.bool, empty)
        if not self.train:
            more = [(row, mel) for row, s in enumerate(samples) for mel in s.get("audio_more", ())]
            batch["audio_more"] = _stack_or_zeros([mel for _, mel in more], mel_shape, torch.float32, empty)
            batch["audio_more_owner"] = torch.tensor([row for row, _ in more], dtype=torch.long)
        for name in self.cfg.members.task_fields:
            values = [s["meta"].get(name) for s in samples]
            if name == "label":
                batch["label"] = torch.tensor([v if isinstance(v, int) else -1 for v in values], dtype=torch.long)
            else:
                batch[name] = values
        return batch


@dataclass
class BatchNormalize:
    """A transform's final ``ToTensor`` + ``Normalize``, applied to a whole batch of uint8 images at once: the same
    float32 operations in the same order (``/ 255``, ``- mean``, ``/ std``), so the same bits, at about half the
    cost of running them per sample and stacking (no per-sample float intermediates). ``tail`` is the original pair,
    for an image the fast path does not take (not 8-bit RGB after the rest of the transform)."""

    mean: torch.Tensor  # [C, 1, 1] float32
    std: torch.Tensor
    tail: Callable

    def collate(self, images: list, shape: tuple[int, ...], empty: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        out = (empty or _empty_batch)((len(images), *shape), torch.float32)
        for i, image in enumerate(images):
            if image is None:
                out[i].zero_()
            else:
                out[i].copy_(image)  # uint8 converts exactly; a float image (the tail's output) is already done
        raw = [i for i, image in enumerate(images) if image is not None and image.dtype == torch.uint8]
        for rows in [out] if len(raw) == len(images) else [out[i] for i in raw]:  # the batch at once, else per row
            rows.div_(255).sub_(self.mean).div_(self.std)
        return out


def split_tensor_tail(transform: Callable | None) -> tuple[Callable | None, BatchNormalize | None]:
    """(the transform before its final ``ToTensor`` + ``Normalize``, those two as a ``BatchNormalize``) for a
    torchvision ``Compose`` that ends with them, as open_clip's train and eval transforms do; else (transform, None)."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, Compose) or not steps or len(steps) < 2:
        return transform, None
    to_tensor, normalize = steps[-2:]
    if not isinstance(to_tensor, ToTensor) or type(normalize) is not Normalize or normalize.inplace:
        return transform, None
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1)
    if mean.numel() != 3 or std.numel() != 3:
        return transform, None
    return Compose(steps[:-2]), BatchNormalize(mean, std, Compose(steps[-2:]))


def decode_audio(data: bytes, cfg: AudioFeatureConfig, train: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log-mel ``[n_mels, frames]``, valid mask ``[frames]``) per window of a clip: when training one, at a random
    offset in a clip longer than a window, SpecAugmented when configured; when evaluating up to
    ``cfg.eval_windows``, spread evenly over the clip, the first at its start. Only the clip's first
    ``cfg.max_seconds`` count, and only the windows' samples are decoded."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            segments = _read_windows(f, cfg, train)
    except Exception as err:  # libsndfile errors for corrupt audio
        raise SampleError("audio_decode_error", type(err).__name__) from None
    windows = [log_mel(_mono(samples, rate, cfg.sample_rate), cfg) for samples in segments]
    if train and cfg.spec_augment.enabled:
        spec_augment(windows[0][0], cfg.spec_augment)
    return windows


def _read_windows(f: sf.SoundFile, cfg: AudioFeatureConfig, train: bool) -> list[np.ndarray]:
    """The samples (at the file's rate) each window's log-mel reads: a seek and a read per window where the file
    says its length, else one read of what may count, then cut. Windows start so that their frames lie within the
    clip's first ``max_seconds`` (a header claiming hours costs nothing)."""
    scale = f.samplerate / cfg.sample_rate
    span = max(1, round(cfg.frames * cfg.hop_length * scale))  # one window's frames, in samples
    length = int(((cfg.frames + 1) * cfg.hop_length + cfg.n_fft) * scale) + 1  # what its log-mel reads
    cap = max(span, int(cfg.max_seconds * f.samplerate))
    if not (f.seekable() and f.frames > 0):
        clip = f.read(frames=cap + length - span, dtype="float32", always_2d=True)
        return [clip[o:o + length] for o in window_offsets(min(len(clip), cap), span, train, cfg.eval_windows)]
    segments = []
    for offset in window_offsets(min(f.frames, cap), span, train, cfg.eval_windows):
        f.seek(offset)
        segments.append(f.read(frames=length, dtype="float32", always_2d=True))
    return segments


def window_offsets(total: int, span: int, train: bool, max_windows: int) -> list[int]:
    """Where the windows (``span`` samples each) of a clip of ``total`` samples start. Training: one, uniformly
    at random (torch's default generator). Evaluation: as many as it takes to cover the clip, at most
    ``max_windows``, evenly spaced from its start to its end (the last may overlap the one before)."""
    room = total - span
    if room <= 0:
        return [0]
    if train:
        return [int(torch.randint(0, room + 1, ()))]
    count = min(max_windows, math.ceil(total / span))
    return [round(room * i / (count - 1)) for i in range(count)] if count > 1 else [0]


def _mono(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if samples.size == 0:
        raise SampleError("audio_empty")
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise SampleError("audio_nan")
    return soxr.resample(mono, rate, target_rate) if rate != target_rate else mono


def _draw_caption(caption: str, alternatives: Any) -> str:
    """One of ``caption`` and the distinct non-empty strings in ``alternatives`` (anything else there is ignored),
    drawn from torch's CPU generator (the loader seeds it per sample and epoch). Drawn after the image and audio
    decode, so their augmentation draws are the same with or without alternatives."""
    if not isinstance(alternatives, list):
        return caption
    pool = [caption]
    for text in alternatives:
        text = strip_control(text).strip() if isinstance(text, str) else ""
        if text and text not in pool:
            pool.append(text)
    return pool[int(torch.randint(len(pool), ()))] if len(pool) > 1 else caption


def _first(members: dict[str, bytes], exts: list[str]) -> bytes | None:
    return next((members[e] for e in exts if e in members), None)


def _json(data: bytes | None) -> dict:
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[..." nested deep
        raise SampleError("bad_json") from None
    return value if isinstance(value, dict) else {}


def _empty_batch(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is not None:
        # In a loader worker, build the batch straight in shared memory (as torch's default_collate does): sending
        # it to the training process then passes a file descriptor instead of copying the batch into a new segment.
        return fresh_shared(size, dtype)
    return torch.empty(size, dtype=dtype)


def _stack_or_zeros(values: list, shape: tuple[int, ...], dtype: torch.dtype, empty: Callable[..., torch.Tensor]) -> torch.Tensor:
    out = empty((len(values), *shape), dtype)
    present = [v for v in values if v is not None]
    if present and len(present) == len(values):
        return torch.stack(present, out=out)
    for i, value in enumerate(values):
        if value is None:
            out[i].zero_()
        else:
            out[i] = value
    return out

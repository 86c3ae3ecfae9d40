"""Typed configs of the data stages: ``synth`` (shapes world), ``shard`` (raw pairs → WebDataset), ``verify`` and
``inspect``.

Each component receives only its own sub-config (``ImageConfig`` for the image processor, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmfuse.schema import MISSING, ConfigError

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")
IMAGE_FORMATS = ("jpg", "webp", "png")
INPUT_FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "folder")
MANIFEST_FORMATS = INPUT_FORMATS[:-1]


@dataclass
class SynthOutputConfig:
    path: str = MISSING
    """Folder the raw files and manifest.parquet are written to."""


@dataclass
class SynthConfig:
    """The synthetic shapes world: images, captions, audio and task fields from one seed."""

    output: SynthOutputConfig = field(default_factory=SynthOutputConfig)
    num_samples: int = 256
    """How many scenes to generate."""
    seed: int = 0
    """Everything is a pure function of (seed, sample index)."""
    image_size: int = 128
    """Side of the square images in pixels (64-256 is sensible)."""
    audio_sample_rate: int = 16000
    """Sample rate of the generated clips."""
    audio_seconds: float = 2.0
    """Length of each clip; one tone per object, played one after another."""
    jpeg_quality: int = 92
    """Quality of the written JPEGs."""
    workers: int = 0
    """Processes rendering samples (0 = one per CPU core); the output is the same bytes with any number."""

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("num_samples must be at least 1")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be within 32..1024, got {self.image_size}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 = one per CPU core), got {self.workers}")
        if self.audio_seconds <= 0 or self.audio_sample_rate < 1000:
            raise ConfigError("audio_seconds must be > 0 and audio_sample_rate >= 1000")


@dataclass
class InputConfig:
    path: str = MISSING
    """A manifest (parquet, csv, tsv, jsonl, optionally .gz), a glob of manifests, or a folder of files grouped by
    stem (a.jpg + a.txt + a.flac). Local path or any fsspec URL."""
    format: str = "auto"
    """One of auto, parquet, csv, tsv, jsonl, folder; auto looks at the path."""
    image_column: str = "image"
    """Manifest column with the image path or URL (img2dataset: url)."""
    text_column: str = "text"
    """Manifest column with the caption (img2dataset: caption)."""
    audio_column: str = "audio"
    """Manifest column with the audio path or URL."""
    pass_through: bool = True
    """Copy every other manifest column into each sample's json."""


@dataclass
class OutputConfig:
    path: str = MISSING
    """Folder or object-store URL (s3://bucket/prefix) the shards go to. The S3 endpoint and credentials come from
    the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), never from this file."""
    prefix: str = "shard"
    """Shard file names are {prefix}-{NNNNNN}.tar."""
    samples_per_shard: int = 1000
    """Input rows per shard; the last shard may hold fewer."""
    upload_retries: int = 3
    """Retries of a failed upload to object storage (exponential backoff)."""


@dataclass
class FetchConfig:
    threads: int = 16
    """Concurrent fetches per worker process (I/O-bound: http, s3)."""
    timeout: float = 10.0
    """Seconds before a connection or a stalled read gives up."""
    retries: int = 2
    """Retries after a transient failure (5xx, 429, reset, timeout); none for 4xx."""
    backoff: float = 0.5
    """First retry waits this many seconds; each next one twice as long."""
    max_redirects: int = 5
    """More redirects than this is a failure (too_many_redirects)."""
    max_bytes: int = 50_000_000
    """A download larger than this is a failure (too_large)."""
    honor_opt_out: bool = True
    """Skip responses whose X-Robots-Tag says noai, noimageai, noindex or noimageindex (reason opt_out)."""
    user_agent: str = "mmfuse/0.1 (+https://github.com/mmfuse/mmfuse)"
    """User-Agent sent with http requests."""


@dataclass
class ImageConfig:
    size: int = 256
    """Target side in pixels (shorter side for keep_ratio and center_crop, longer side for border)."""
    resize_mode: str = "keep_ratio"
    """keep_ratio (shorter side = size), center_crop (size x size), border (fit and pad to size x size), no."""
    resize_only_if_bigger: bool = False
    """Never upscale: keep images smaller than size as they are."""
    format: str = "jpg"
    """Encoding of the stored image: jpg, webp or png."""
    quality: int = 90
    """JPEG/WebP quality."""
    min_side: int = 8
    """Images whose shorter side is below this fail with image_too_small (1x1 tracking pixels, spacers); 1 keeps
    every image."""
    max_aspect_ratio: float = 20.0
    """Images with longer/shorter side above this fail with bad_aspect_ratio (a 468x1 banner would resize to
    119808x256); 0 disables the check (an image whose resized size no encoder can write still fails, as
    image_too_large)."""
    max_pixels: int = 89_478_485
    """Header pixel count above which an image is refused before decoding (decompression bomb)."""
    border_color: int = 255
    """Grey level of the padding in border mode and of the background behind transparency."""


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    """Target sample rate; other rates are resampled (soxr)."""
    max_seconds: float = 10.0
    """Longer clips are clipped to this length."""
    pad: bool = False
    """Pad shorter clips with silence to max_seconds."""


@dataclass
class TextConfig:
    min_chars: int = 1
    """Captions shorter than this (after whitespace normalisation) fail with text_too_short; empty ones with
    text_empty."""
    max_chars: int = 2000
    """Captions longer than this fail with text_too_long."""


@dataclass
class ShardConfig:
    """Raw pairs → WebDataset shards + per-shard parquet and stats + sizes.json + dataset.json."""

    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    processes: int = 2
    """Worker processes on this machine (the embedded distributor); 1 runs in-process."""
    dedup: bool = True
    """Drop exact duplicates: repeated manifest rows across the run, and repeated content within a shard."""
    retry_failed: bool = False
    """On a rerun, redo only the failed samples of finished shards (keeping their good samples)."""
    require: list[str] = field(default_factory=list)
    """Modalities a sample must have (image, text, audio); a sample missing one fails with missing_<modality>."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        if self.input.format not in INPUT_FORMATS:
            raise ConfigError(f"input.format must be one of {INPUT_FORMATS}, got {self.input.format!r}")
        if self.image.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"image.resize_mode must be one of {RESIZE_MODES}, got {self.image.resize_mode!r}")
        if self.image.format not in IMAGE_FORMATS:
            raise ConfigError(f"image.format must be one of {IMAGE_FORMATS}, got {self.image.format!r}")
        if not 1 <= self.image.quality <= 100:
            raise ConfigError(f"image.quality must be within 1..100, got {self.image.quality}")
        if self.output.samples_per_shard < 1:
            raise ConfigError("output.samples_per_shard must be at least 1")
        if self.processes < 1 or self.fetch.threads < 1:
            raise ConfigError("processes and fetch.threads must be at least 1")
        if self.image.size < 1:
            raise ConfigError("image.size must be at least 1")
        unknown = set(self.require) - {"image", "text", "audio"}
        if unknown:
            raise ConfigError(f"require lists unknown modalities {sorted(unknown)}; use image, text, audio")


@dataclass
class VerifyConfig:
    """Read every shard of a dataset and check it against sizes.json and the per-shard stats."""

    path: str = MISSING
    """Dataset folder or object-store URL."""
    decode: bool = True
    """Also decode every image and audio member (slower, catches corrupt payloads)."""


@dataclass
class InspectOutputConfig:
    path: str = MISSING
    """Folder (or object-store URL) that index.html, contact_sheet.png, samples.json, images/, audio/ and plots/ are
    written to; created if missing."""


@dataclass
class InspectManifestConfig:
    """How a manifest given as the dataset is read (the same columns as ``mmfuse shard``'s ``input``)."""

    format: str = "auto"
    """One of auto, parquet, csv, tsv, jsonl; auto looks at the path."""
    image_column: str = "image"
    """Column with the image path or URL (img2dataset: url)."""
    text_column: str = "text"
    """Column with the caption (img2dataset: caption)."""
    audio_column: str = "audio"
    """Column with the audio path or URL."""


@dataclass
class InspectConfig:
    """Look at a dataset before training on it: a reproducible sample drawn as a contact sheet, an HTML page of
    samples and summary plots."""

    path: str = MISSING
    """Dataset: a shards folder (sizes.json), an img2dataset output folder, a .tar or brace pattern, or a manifest
    (parquet, csv, tsv, jsonl); local or object-store URL."""
    output: InspectOutputConfig = field(default_factory=InspectOutputConfig)
    num_samples: int = 48
    """Samples drawn (fewer when the dataset holds fewer)."""
    seed: int = 0
    """The same seed draws the same samples from the same dataset."""
    shards: int = 8
    """Shards the samples are drawn from, picked uniformly by seed among the non-empty ones, then samples uniformly
    among theirs. Each picked shard is read only up to its last drawn sample. 0: every shard (an even sample of the
    whole dataset, but up to num_samples shards are opened)."""
    thumb_size: int = 160
    """Side of one image in the contact sheet, in pixels."""
    page_image_size: int = 512
    """Longest side of the images written for the page; a smaller JPEG, PNG or WebP is copied as it is."""
    audio_seconds: float = 30.0
    """Only this much of each clip is read and drawn."""
    max_member_bytes: int = 50_000_000
    """Tar members and fetched files larger than this are not read."""
    max_image_pixels: int = 89_478_485
    """Images whose header claims more pixels are not decoded (decompression bombs)."""
    progress: bool = True
    """Show a progress bar."""
    manifest: InspectManifestConfig = field(default_factory=InspectManifestConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    """How a manifest's media are fetched (http, s3, local)."""

    def validate(self) -> None:
        if not 1 <= self.num_samples <= 1000:
            raise ConfigError(f"num_samples must be within 1..1000, got {self.num_samples}")
        if self.shards < 0:
            raise ConfigError(f"shards must be >= 0 (0: every shard), got {self.shards}")
        if not 32 <= self.thumb_size <= 1024 or self.page_image_size < 32:
            raise ConfigError("thumb_size must be within 32..1024 and page_image_size at least 32")
        if self.audio_seconds <= 0:
            raise ConfigError("audio_seconds must be > 0")
        if self.manifest.format not in MANIFEST_FORMATS:
            raise ConfigError(f"manifest.format must be one of {MANIFEST_FORMATS}, got {self.manifest.format!r}")


LOADER_MODES = ("exact", "resampled")


@dataclass
class SpecAugmentConfig:
    """SpecAugment (Park et al. 2019) on the training log-mel: bands of mel bins and runs of frames set to the
    spectrogram's floor, the value padding has. Off by default (0 masks); evaluation never masks."""

    freq_masks: int = 0
    """Frequency masks per clip."""
    freq_width: int = 8
    """Widest frequency mask in mel bins (each mask's width is drawn from 0..freq_width)."""
    time_masks: int = 0
    """Time masks per clip."""
    time_width: int = 20
    """Widest time mask in frames (each mask's width is drawn from 0..time_width)."""

    @property
    def enabled(self) -> bool:
        return self.freq_masks > 0 or self.time_masks > 0


@dataclass
class AudioFeatureConfig:
    """Log-mel spectrograms of fixed shape, as the audio tower expects them.

    The front end (``FRONT_END``: sample rate, mel bands, FFT, hop, frames, band edges) is part of the model: a
    pre-training run records it in its release, and fine-tuning takes it from there (``from_recorded``)."""

    sample_rate: int = 16000
    """Clips at other rates are resampled (soxr)."""
    n_mels: int = 64
    """Mel bands (the spectrogram's height). In pretrain and finetune configs 0 (their default): the model's."""
    n_fft: int = 400
    """FFT size (25 ms at 16 kHz)."""
    hop_length: int = 160
    """Hop between frames (10 ms at 16 kHz)."""
    frames: int = 200
    """Frames of one window (the spectrogram's width); a shorter clip is padded and masked. In pretrain and finetune
    configs 0 (their default): the model's."""
    f_min: float = 0.0
    """Lowest mel band edge in Hz."""
    f_max: float = 0.0
    """Highest mel band edge in Hz; 0 means sample_rate / 2."""
    max_seconds: float = 30.0
    """Only this much of a clip counts: a clip longer than one window is cropped at a random offset within its first
    max_seconds when training, and embedded as pooled windows over them when evaluating. Bounds what a header
    claiming hours can cost."""
    eval_windows: int = 4
    """Evaluation: a clip longer than one window is embedded as the mean of up to this many windows spread evenly
    over it (1: its first window only)."""
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)

    def validate(self) -> None:
        if self.max_seconds <= 0 or self.eval_windows < 1:
            raise ConfigError(f"audio.max_seconds must be > 0 and audio.eval_windows >= 1, got {self.max_seconds} and "
                              f"{self.eval_windows}")
        augment = self.spec_augment
        if min(augment.freq_masks, augment.freq_width, augment.time_masks, augment.time_width) < 0:
            raise ConfigError("audio.spec_augment counts and widths must be >= 0")


FRONT_END = ("sample_rate", "n_mels", "n_fft", "hop_length", "frames", "f_min", "f_max")
"""The fields that say what a log-mel input means: a model trained on one setting of them must be fed the same."""
UNSET = {"f_min": -1.0, "f_max": -1.0}
"""A front-end field at this value (0 for the others) is not set by the user: it comes from the model or release."""
LEGACY_FRONT_END = {"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "f_min": 0.0, "f_max": 0.0}
"""What releases from before the front end was recorded in full were made with (the only settings they wrote)."""


def from_recorded(configured: AudioFeatureConfig, recorded: dict, source: str, fix: str) -> AudioFeatureConfig:
    """``configured`` with its unset front-end fields taken from ``recorded`` (the model's or a release's values).

    A field the user set to something else is a conflict, never silently replaced: the error names both values,
    ``source`` (where the recorded one comes from) and ``fix`` (what to do, formatted with ``name`` and ``want``)."""
    values = {}
    for name, want in recorded.items():
        have = getattr(configured, name)
        if have == UNSET.get(name, 0):
            values[name] = type(have)(want)
        elif have != want:
            raise ConfigError(f"data.audio.{name}={have} conflicts with {source} {name}={want}: "
                              + fix.format(name=name, want=want))
    return dataclasses.replace(configured, **values)


def extensions(spec: str) -> list[str]:
    """A ``MembersConfig`` field (``"jpg;jpeg;png"``) as the extensions it lists, lower case."""
    return [e.strip().lower() for e in spec.split(";") if e.strip()]


@dataclass
class MembersConfig:
    """Which tar members hold which modality; the first present extension wins."""

    image: str = "jpg;jpeg;png;webp"
    """Image member extensions, ';'-separated."""
    text: str = "txt;text;caption"
    """Caption member extensions, ';'-separated."""
    text_json_field: str = "text"
    """When no caption member exists, the json member's field holding the caption (LAION-CLAP layout)."""
    text_choices_json_field: str = "captions"
    """The json member's list of alternative captions of the same sample (COCO-style, five per image). Training
    draws one caption per sample per epoch from these and the caption member, seeded like every augmentation
    (identical after a resume); evaluation always reads the caption member. Empty: the caption member only."""
    audio: str = "flac;wav;mp3;ogg"
    """Audio member extensions, ';'-separated."""
    json: str = "json"
    """Metadata member; its task fields (label, question, answers, captions, ...) pass through."""
    task_fields: list[str] = field(default_factory=lambda: ["label", "question", "question_id", "answers", "captions"])
    """json fields copied into every batch (missing ones become None / -1)."""


@dataclass
class LoaderConfig:
    """The streaming training loader: shards (local or object store) → decoded, batched tensors."""

    train: str = MISSING
    """Dataset(s): a folder or URL with sizes.json, a brace pattern (shard-{000000..000099}.tar) or a .tar;
    several joined by '::' are mixed."""
    keep: str = ""
    """A subset index from ``mmfuse curate`` (OUT/index.parquet or OUT): train on the samples it keeps, read from
    the original shards (the others are passed over by their tar headers). One dataset in train."""
    weights: list[float] = field(default_factory=list)
    """Mixing weights, one per '::'-separated dataset (resampled mode); empty = proportional to size."""
    mode: str = "exact"
    """exact: every sample once per epoch, deterministic shuffle from (seed, epoch). resampled: shards drawn with
    replacement by weight, epoch = samples_per_epoch."""
    batch_size: int = 32
    """Samples per batch on each rank."""
    workers: int = 2
    """Loader processes per rank (0 decodes in the training process)."""
    seed: int = 0
    """Shuffle seed; the order of epoch e is a function of (seed, e)."""
    samples_per_epoch: int = 0
    """Resampled mode: samples per epoch over all ranks (0 = the datasets' total size)."""
    shuffle_window: int = 1000
    """Samples shuffled together within each worker's stream (memory: this many raw samples per worker)."""
    require: list[str] = field(default_factory=list)
    """Modalities a sample must have (image, text, audio); others are kept with a presence mask of False."""
    max_member_bytes: int = 50_000_000
    """Tar members larger than this are skipped unread (counted as member_too_large)."""
    max_image_pixels: int = 89_478_485
    """Images whose header claims more pixels are skipped (decompression bombs)."""
    max_image_aspect_ratio: float = 20.0
    """Images with longer/shorter side above this are skipped (bad_aspect_ratio): the model's resize would blow a
    20000x1 strip up to billions of pixels. 0 disables the check."""
    read_retries: int = 3
    """Reopen-and-seek retries after a transient read error mid-shard (object stores)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    worker_nice: int = 10
    """Niceness added to loader worker processes (0-19). Where workers and training ranks share cores, the ranks go
    first: every collective waits for the slowest rank, so a rank descheduled for a worker stalls them all, while
    a worker runs ahead by prefetch_factor batches. With a core per process it changes nothing. 0: equal."""
    members: MembersConfig = field(default_factory=MembersConfig)
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)

    def validate(self) -> None:
        if self.mode not in LOADER_MODES:
            raise ConfigError(f"mode must be one of {LOADER_MODES}, got {self.mode!r}")
        if self.batch_size < 1 or self.workers < 0 or self.shuffle_window < 1:
            raise ConfigError("batch_size and shuffle_window must be >= 1 and workers >= 0")
        if not 0 <= self.worker_nice <= 19:
            raise ConfigError(f"worker_nice must be 0-19, got {self.worker_nice}")
        n_sources = len(self.train.split("::"))
        if self.weights and len(self.weights) != n_sources:
            raise ConfigError(f"weights has {len(self.weights)} entries for {n_sources} '::'-separated datasets in train")
        if any(w < 0 for w in self.weights) or (self.weights and not sum(self.weights) > 0):
            raise ConfigError("weights must be >= 0 and not all 0")
        unknown = set(self.require) - {"image", "text", "audio"}
        if unknown:
            raise ConfigError(f"require lists unknown modalities {sorted(unknown)}; use image, text, audio")
        self.audio.validate()

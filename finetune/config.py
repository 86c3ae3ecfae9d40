"""Typed config of ``mmfuse finetune`` / ``mmfuse eval``: checkpoint, task, data, optimizer, run, launch.

One config per task in ``configs/finetune/<task>.yaml``; every task's own settings live under its name
(``zeroshot.templates``, ``caption.beam_size``, ``vqa.answers``, ``classify.fusion``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import AudioFeatureConfig, MembersConfig
from finetune.tasks import TASKS
from mmfuse.schema import MISSING, ConfigError
from mmfuse.tracking import LogConfig

DATA_FORMATS = ("auto", "shards", "coco", "vqa", "folder", "manifest")
TOWERS = ("image", "text", "audio")
PAIRS = ("image_text", "audio_text", "image_audio")
FUSIONS = ("early", "late", "hybrid", "cross_attention")


@dataclass
class FinetuneDataConfig:
    train: str = ""
    """Training data: shards (a dataset folder with sizes.json, a brace pattern, a .tar), a COCO captions JSON,
    a VQA questions JSON, a class-per-folder image tree or a CSV/JSONL manifest. Empty for evaluation only."""
    eval: str = MISSING
    """Evaluation data, same kinds as train."""
    format: str = "auto"
    """auto (from the path), shards, coco, vqa, folder or manifest."""
    train_images: str = ""
    """Image folder that file names in a COCO / VQA / manifest train file are relative to (default: its folder)."""
    eval_images: str = ""
    """Image folder for the eval file (default: its folder)."""
    train_annotations: str = ""
    """VQA format: the annotations JSON that goes with the train questions JSON."""
    eval_annotations: str = ""
    """VQA format: the annotations JSON that goes with the eval questions JSON."""
    image_template: str = ""
    """VQA format without an ``images`` list: a question's image file name, relative to data.train_images /
    data.eval_images, from {image_id} (an int: {image_id:012d} pads it) and {subtype} (the JSON's data_subtype),
    e.g. {image_id}.png. Empty: COCO's naming, {subtype}/COCO_{subtype}_{image_id:012d}.jpg, which needs a
    data_subtype in the questions JSON."""
    warn_skipped_fraction: float = 0.1
    """Warn loudly at the end when more than this share of the training samples read was skipped (a missing or
    undecodable file); a split with no usable sample at all is an error."""
    batch_size: int = 32
    """Samples per batch on each rank (training and evaluation)."""
    workers: int = 1
    """Loader processes per rank."""
    seed: int = 0
    """Shuffle seed; the order of epoch e is a function of (seed, e)."""
    shuffle_window: int = 1000
    """Shards: samples shuffled together within each worker's stream."""
    max_eval_samples: int = 0
    """Evaluate at most this many samples (0 = all)."""
    members: MembersConfig = field(default_factory=MembersConfig)
    # The audio front end is the checkpoint's (its release records it): 0 (-1.0 for f_min / f_max) takes the
    # checkpoint's value, anything else must equal it. max_seconds, eval_windows and spec_augment are this run's.
    audio: AudioFeatureConfig = field(default_factory=lambda: AudioFeatureConfig(
        sample_rate=0, n_mels=0, n_fft=0, hop_length=0, frames=0, f_min=-1.0, f_max=-1.0))


@dataclass
class ZeroshotConfig:
    modality: str = "image"
    """Inputs to classify: image or audio."""
    classnames: list[str] = field(default_factory=list)
    """Class names in label order; empty = classnames_file, else the data's label_name fields."""
    classnames_file: str = ""
    """A JSON list or a text file with one class name per line."""
    templates: list[str] = field(default_factory=list)
    """Prompt templates; a class's embedding is the mean over its templates. Empty: the templates the release was
    evaluated with at pre-training (phrased like its captions), else CLIP's ("a photo of a {}.", "a {}.", "{}")."""
    train: str = "none"
    """none (zero-shot only), linear (linear probe: frozen tower, head initialised from the zero-shot classifier)
    or full (tower + head)."""
    wise_ft: float = -1.0
    """WiSE-FT: after training, also evaluate (1 - a) x zero-shot weights + a x fine-tuned weights (a in [0, 1];
    -1 disables)."""


@dataclass
class RetrievalConfig:
    pairs: list[str] = field(default_factory=lambda: ["image_text"])
    """Modality pairs to score (image_text, audio_text, image_audio); fine-tuning trains a contrastive loss on them."""
    all_captions: bool = True
    """Image/audio ↔ text with every reference caption of a sample (the json captions field, COCO's protocol)
    when present; otherwise the sample's one caption."""
    chunk: int = 1024
    """Queries scored at a time (memory is chunk x gallery size)."""


@dataclass
class CaptionConfig:
    layers: int = 2
    """Cross-attention decoder layers (CoCa's multimodal decoder)."""
    max_len: int = 20
    """Longest generated caption in tokens."""
    beam_size: int = 3
    """Beam search width (1 = greedy)."""
    length_penalty: float = 0.0
    """Beam scores are divided by length ** length_penalty."""
    sampling: bool = False
    """Nucleus sampling instead of beam search."""
    top_p: float = 0.9
    temperature: float = 1.0


@dataclass
class VqaConfig:
    answers: int = 100
    """Answer vocabulary: the most frequent (normalised) training answers."""
    mode: str = "classify"
    """classify (fused image-question features → answer vocabulary, soft-score BCE) or generate (the caption
    decoder continues the question with the answer)."""
    hidden: int = 0
    """Width of the answer head's hidden layer (0 = twice the fusion width)."""
    read: str = "mask"
    """The fused token the answer (classify mode) head reads: ``mask``, the question's end-of-text slot given the
    mask embedding of pre-training's masked words instead (the fusion encoder learned to fill those from the
    image), or ``eot``, the end-of-text token itself. On the demo (freeze=[image], lr 1e-3, 600 steps), two
    releases: 60.7 -> 64.5 and 61.6 -> 63.2 VQA accuracy (docs/demo.md)."""


@dataclass
class ClassifyConfig:
    modalities: list[str] = field(default_factory=lambda: ["image", "text", "audio"])
    """Inputs of the classifier."""
    fusion: str = "late"
    """early (concatenate embeddings, one head), late (a head per modality, predictions averaged), hybrid (both,
    summed) or cross_attention (the fusion encoder over every modality's tokens)."""
    num_classes: int = 0
    """0 = from the training data's largest label + 1."""
    modality_dropout: float = 0.2
    """Training: drop each present modality of a sample with this probability (never all), for robustness to a
    missing modality at test time."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Learning rate of pre-trained weights (the top layer; lower layers get layer_decay powers of it)."""
    head_lr: float = 1e-3
    """Learning rate of new heads and decoders."""
    layer_decay: float = 1.0
    """Layer-wise lr decay: layer i of L gets lr x layer_decay ** (L - i) (1 = off)."""
    weight_decay: float = 0.05
    """AdamW weight decay; never applied to norms, biases, embeddings or temperatures."""
    warmup_steps: int = 10
    schedule: str = "cosine"
    """cosine (to min_lr_ratio x lr at the last step) or constant after warmup (pretrain/optim.py, as pre-training)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 disables)."""


@dataclass
class RunConfig:
    dir: str = MISSING
    """Run folder: config.yaml, checkpoints/, metrics.jsonl, metrics.json, predictions, RESULTS.md."""
    steps: int = 100
    """Training steps (ignored by mmfuse eval and by zeroshot with train=none)."""
    log_every: int = 10
    eval_every: int = 0
    """Steps between evaluations (0: only at the end)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end and on signals)."""
    keep: int = 2
    """Committed checkpoints to keep."""
    resume: str = "auto"
    """auto (newest committed checkpoint in the run folder), none, or a checkpoint folder."""
    baseline: bool = False
    """Also evaluate before training (the untrained baseline: new heads at their initialisation)."""


@dataclass
class EngineConfig:
    """The same keys as pre-training's engine (mmfuse pretrain --help)."""

    zero_stage: int = 0
    """0: DDP; 1 or 2: DeepSpeed ZeRO (optimizer state / gradients sharded over ranks) through Accelerate's plugin."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (Accelerate's mixed precision; fp16 needs a GPU)."""


@dataclass
class RetentionConfig:
    data: str = ""
    """Labelled eval data for zero-shot classification before and after fine-tuning (empty: off)."""
    modality: str = "image"
    templates: list[str] = field(default_factory=list)
    """Prompt templates; empty: as zeroshot.templates."""


@dataclass
class LaunchConfig:
    nproc: int = 0
    """Spawn this many local processes (gloo on CPU); 0 runs in this process. Ignored under torchrun / srun."""
    master_port: int = 0


@dataclass
class FinetuneConfig:
    """Fine-tune a released checkpoint on one task and evaluate it (mmfuse eval: evaluate only)."""

    RENAMED = {"run.deepspeed_stage": "engine.zero_stage", "run.precision": "engine.precision"}  # until the next release

    task: str = MISSING
    """The task: a name in finetune.tasks.TASKS (this help's first line lists them)."""
    checkpoint: str = MISSING
    """A release folder (local or s3://), or an open_clip checkpoint file (.safetensors / .bin / .pt) with
    open_clip_model set."""
    open_clip_model: str = ""
    """For an open_clip checkpoint file: its architecture, an open_clip model name (ViT-B-16) or a JSON model
    config file (open_clip_config.json)."""
    flavor: str = ""
    """If set, the checkpoint's model flavor must be this one (a guard against loading the wrong checkpoint)."""
    freeze: list[str] = field(default_factory=list)
    """Towers to freeze (image, text, audio)."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    zeroshot: ZeroshotConfig = field(default_factory=ZeroshotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    vqa: VqaConfig = field(default_factory=VqaConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    """Seeds head initialisation, dropout and modality dropout."""

    def validate(self) -> None:
        TASKS.check(self.task, "task")
        if self.data.format not in DATA_FORMATS:
            raise ConfigError(f"data.format must be one of {DATA_FORMATS}, got {self.data.format!r}")
        for name, values, allowed in (("freeze", self.freeze, TOWERS), ("retrieval.pairs", self.retrieval.pairs, PAIRS),
                                      ("classify.modalities", self.classify.modalities, TOWERS)):
            unknown = set(values) - set(allowed)
            if unknown:
                raise ConfigError(f"{name} lists unknown values {sorted(unknown)}; use {', '.join(allowed)}")
        if self.zeroshot.modality not in ("image", "audio") or self.retention.modality not in ("image", "audio"):
            raise ConfigError("zeroshot.modality and retention.modality must be image or audio")
        if self.zeroshot.train not in ("none", "linear", "full"):
            raise ConfigError(f"zeroshot.train must be none, linear or full, got {self.zeroshot.train!r}")
        if self.zeroshot.wise_ft != -1.0 and not 0.0 <= self.zeroshot.wise_ft <= 1.0:
            raise ConfigError(f"zeroshot.wise_ft must be in [0, 1] (or -1 to disable), got {self.zeroshot.wise_ft}")
        if self.classify.fusion not in FUSIONS:
            raise ConfigError(f"classify.fusion must be one of {FUSIONS}, got {self.classify.fusion!r}")
        if not self.classify.modalities:
            raise ConfigError("classify.modalities must name at least one modality")
        if self.vqa.mode not in ("classify", "generate"):
            raise ConfigError(f"vqa.mode must be classify or generate, got {self.vqa.mode!r}")
        if self.vqa.read not in ("mask", "eot"):
            raise ConfigError(f"vqa.read must be mask or eot, got {self.vqa.read!r}")
        if self.caption.beam_size < 1 or self.caption.max_len < 1 or not 0.0 < self.caption.top_p <= 1.0:
            raise ConfigError("caption.beam_size and caption.max_len must be >= 1 and caption.top_p in (0, 1]")
        if self.optim.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be cosine or constant, got {self.optim.schedule!r}")
        if not 0.0 < self.optim.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.optim.layer_decay}")
        if self.engine.precision == "no":  # Accelerate's name, as run.precision took it
            self.engine.precision = "fp32"
        if self.engine.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"engine.precision must be fp32, bf16 or fp16, got {self.engine.precision!r}")
        if not 0 <= self.engine.zero_stage <= 2:
            raise ConfigError(f"engine.zero_stage must be 0 (DDP), 1 or 2, got {self.engine.zero_stage} (ZeRO-3 would "
                              "partition the weights the evaluation and the heads read directly)")
        if self.data.image_template:
            try:
                self.data.image_template.format(image_id=0, subtype="")
            except (KeyError, IndexError, ValueError) as err:
                raise ConfigError(f"data.image_template={self.data.image_template!r} must use only {{image_id}} and "
                                  f"{{subtype}} ({type(err).__name__}: {err})") from None
        if self.data.batch_size < 1 or self.data.workers < 0:
            raise ConfigError("data.batch_size must be >= 1 and data.workers >= 0")
        if self.run.steps < 0:
            raise ConfigError("run.steps must be >= 0")
        self.data.audio.validate()

    @property
    def trains(self) -> bool:
        """Whether ``mmfuse finetune`` trains for this task (zero-shot without a probe only evaluates)."""
        return self.run.steps > 0 and not (self.task == "zeroshot" and self.zeroshot.train == "none")

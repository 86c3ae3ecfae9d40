"""Typed config of ``mmfuse pretrain``: model (a flavor), data, objectives, optimizer, engine, run, launch."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from data_pipeline.config import AudioFeatureConfig, LoaderConfig, from_recorded
from mmfuse.config import MISSING, ConfigError
from mmfuse.tracking import LogConfig
from pretrain.model.config import ModelConfig
from pretrain.objectives.config import ObjectivesConfig

PRESETS = {"model.flavor": "model/{}.yaml"}
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("skip", "halt")
TOWERS = ("image", "text", "audio")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# CLIP-style prompts, for data whose captions were not phrased otherwise. A run whose captions follow a pattern
# sets eval.templates to it; the release records them, and zero-shot fine-tuning uses them by default.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "{}")


@dataclass
class EvalConfig:
    """In-loop evaluation (``pretrain.evaluate``)."""

    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """Prompt templates for zero-shot classifiers; the class embedding is the mean over templates. Phrase them as
    the training captions are phrased: the release records them, and zero-shot fine-tuning uses them by default."""
    classnames: list[str] = field(default_factory=list)
    """Class names in label order; empty = taken from the eval data's json label / label_name fields."""
    batch_size: int = 64
    """Samples per eval batch on each rank."""
    max_samples: int = 0
    """Evaluate at most this many samples (0 = all)."""


@dataclass
class PretrainDataConfig(LoaderConfig):
    # The mel shape is the audio tower's input: 0 takes the model's (a value that differs from it is an error).
    audio: AudioFeatureConfig = field(default_factory=lambda: AudioFeatureConfig(n_mels=0, frames=0))
    eval: str = ""
    """Held-out dataset(s) for in-loop evaluation (zero-shot and retrieval); empty disables it."""
    warn_skipped_fraction: float = 0.1
    """At the end of the run, warn loudly when more than this share of the training samples read was skipped
    (undecodable, missing, too large); the counts per reason are in metrics.jsonl as data_errors/*."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.2
    """AdamW weight decay; never applied to norms, biases, embeddings or temperatures."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    """Linear warmup from 0 to lr."""
    schedule: str = "cosine"
    """cosine (to min_lr_ratio x lr at the last step) or constant after warmup."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass
class EngineConfig:
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    precision: str = "auto"
    """auto (bf16 on GPUs that support it, fp32 on CPU), fp32, bf16 (GPU or CPU) or fp16 (GPU, dynamic loss
    scaling): DeepSpeed's modes, bf16/fp16 weights with fp32 master copies in the optimizer."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The contrastive negatives of each micro-step are its own global batch
    (world_size x data.batch_size), not the accumulated one."""
    gradient_checkpointing: list[str] = field(default_factory=list)
    """Towers (image, text, audio) whose transformer blocks recompute their activations in backward: less
    activation memory for about one more forward pass of compute. Losses and gradients are unchanged."""
    compile: list[str] = field(default_factory=list)
    """Towers (image, text, audio) whose transformer blocks run through torch.compile (each block compiled in
    place, one graph shared by all layers). The first steps pay the compilation (about a minute on a CPU for all
    three tiny towers); not with zero_stage=3."""
    compile_mode: str = "default"
    """torch.compile mode for engine.compile: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs."""
    trim_text_padding: bool = True
    """The contrastive objective's causal text pass leaves out the padding columns after the batch's last
    end-of-text token (rounded up to 8): the pooled text features are unchanged up to float rounding, and the text
    tower costs what the captions' length costs, not the context length's."""
    peak_tflops: float = 0.0
    """Peak dense TFLOPS of one device for the mfu metric; 0 looks the GPU up by name (H100, A100, L4, ...)."""
    extra: dict = field(default_factory=dict)
    """Extra keys merged into the generated DeepSpeed config (escape hatch)."""


@dataclass
class RunConfig:
    dir: str = MISSING
    """Run folder: config.yaml, checkpoints/, metrics.jsonl, tb/, logs/, release/."""
    steps: int = 1000
    """Optimizer steps to train."""
    log_every: int = 10
    """Steps between metric lines (console, metrics.jsonl, TensorBoard)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at the end and on signals)."""
    checkpoint_minutes: float = 0.0
    """Also checkpoint once this many minutes have passed since the last checkpoint (0: off). Rank 0's clock
    decides, for every rank at the same step."""
    save_at_end: bool = True
    """Checkpoint after the last step. Benchmarks turn it off: a ViT-B checkpoint with its optimizer state is GBs.
    Under the slurm launcher a job counts as finished only with that checkpoint: without it, a requeue trains the
    steps after the last checkpoint again."""
    keep: int = 3
    """Committed checkpoints to keep (the newest good one is never deleted)."""
    resume: str = "auto"
    """auto (newest committed checkpoint in the run folder, if any, else in run.checkpoint_sync), none, or a
    checkpoint folder."""
    checkpoint_sync: str = ""
    """Object-store URL (s3://bucket/prefix, any fsspec URL) that every committed checkpoint is uploaded to (its
    COMMITTED marker last; the newest run.keep kept). Credentials come from the environment, never the URL."""
    nonfinite: str = "skip"
    """A non-finite loss or gradient: skip (no update, counted) or halt (checkpoint, exit non-zero)."""
    deterministic: bool = True
    """torch deterministic algorithms (bit-identical resume on CPU)."""
    eval_every: int = 0
    """Steps between in-loop evaluations (0: only at the end, when data.eval is set)."""
    keep_best: str = ""
    """An in-loop evaluation metric that picks the checkpoint to release, e.g. ``zeroshot/image/top1`` or
    ``retrieval/image_to_text/R@1`` (the ``eval/`` prefix is optional; higher is better, lower for a name ending in
    ``loss``). Every evaluation step is then checkpointed, the best one is kept whatever run.keep says
    (``checkpoints/best.json``), and ``mmfuse export`` releases it by default. Empty: the newest checkpoint."""
    eval_untrained: bool = True
    """With data.eval: evaluate the untrained model at step 0 too (not on resume), the baseline that curves.png and
    RESULTS.md show beside every later figure. The training run is the same with or without it."""
    debug_nan_step: int = -1
    """Testing the non-finite policy: make this step non-finite (-1: never), in its first micro-batch."""
    debug_nan_in: str = "loss"
    """Testing the non-finite policy: what debug_nan_step makes non-finite, the loss or (with a finite loss) the
    gradient."""


@dataclass
class LaunchConfig:
    nproc: int = 0
    """Spawn this many local processes (gloo on CPU, NCCL on GPU); 0 runs in this process. Ignored under an
    external launcher (torchrun, srun, the slurm launcher): when WORLD_SIZE is set, this process is a rank."""
    master_port: int = 0
    """Port for a local spawn (0 picks a free one)."""


@dataclass
class PretrainConfig:
    """Pre-train the multimodal model with contrastive and masked objectives under DeepSpeed ZeRO."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    """Seeds model init, masking and dropout; the data order has its own data.seed."""

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        model_audio(self.data.audio, self.model)  # a mel shape that disagrees with the model fails here
        if not 0 <= self.engine.zero_stage <= 3:
            raise ConfigError(f"engine.zero_stage must be 0-3, got {self.engine.zero_stage}")
        if self.engine.offload_params and self.engine.zero_stage != 3:
            raise ConfigError("engine.offload_params needs engine.zero_stage=3")
        if self.engine.offload_optimizer and self.engine.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1")
        if self.engine.precision not in PRECISIONS:
            raise ConfigError(f"engine.precision must be one of {PRECISIONS}, got {self.engine.precision!r}")
        for key in ("gradient_checkpointing", "compile"):
            unknown = set(getattr(self.engine, key)) - set(TOWERS)
            if unknown:
                raise ConfigError(f"engine.{key} lists unknown towers {sorted(unknown)}; use {', '.join(TOWERS)}")
        if self.engine.compile and self.engine.zero_stage == 3:
            raise ConfigError("engine.compile needs engine.zero_stage <= 2 (ZeRO-3 gathers parameters in hooks inside "
                              "the compiled blocks)")
        if self.engine.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"engine.compile_mode must be one of {COMPILE_MODES}, got {self.engine.compile_mode!r}")
        if self.engine.grad_accum < 1:
            raise ConfigError("engine.grad_accum must be >= 1")
        owned = {"zero_optimization.stage": "engine.zero_stage", "gradient_accumulation_steps": "engine.grad_accum",
                 "train_micro_batch_size_per_gpu": "data.batch_size", "train_batch_size": "data.batch_size",
                 "bf16": "engine.precision", "fp16": "engine.precision", "gradient_clipping": "optim.grad_clip",
                 "zero_optimization.offload_optimizer": "engine.offload_optimizer",
                 "zero_optimization.offload_param": "engine.offload_params"}
        for key, own in owned.items():
            section, _, name = key.rpartition(".")
            if name in (self.engine.extra.get(section, {}) if section else self.engine.extra):
                raise ConfigError(f"engine.extra sets {key}, which mmfuse derives from {own}: set {own} instead")
        if self.optim.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.optim.schedule!r}")
        if self.run.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"run.nonfinite must be one of {NONFINITE_POLICIES}, got {self.run.nonfinite!r}")
        if self.run.steps < 1:
            raise ConfigError("run.steps must be >= 1")
        if self.run.checkpoint_minutes < 0:
            raise ConfigError("run.checkpoint_minutes must be >= 0 (0: off)")
        if self.run.keep_best and not self.data.eval:
            raise ConfigError(f"run.keep_best={self.run.keep_best} picks a checkpoint by an in-loop evaluation: set "
                              "data.eval to held-out shards (and run.eval_every), or drop run.keep_best")
        if self.run.debug_nan_in not in ("loss", "grad"):
            raise ConfigError(f"run.debug_nan_in must be loss or grad, got {self.run.debug_nan_in!r}")
        sync = urlsplit(self.run.checkpoint_sync)
        if self.run.checkpoint_sync and ("@" in sync.netloc or sync.query):
            raise ConfigError("run.checkpoint_sync must not carry credentials (user:password@ or a signed query); "
                              "give them through the environment (AWS_ACCESS_KEY_ID, ...)")
        if not 0 < self.objectives.masked_batch_fraction <= 1:
            raise ConfigError(f"objectives.masked_batch_fraction must be in (0, 1], got "
                              f"{self.objectives.masked_batch_fraction}")
        unknown = set(self.objectives.contrastive.pairs) - {"image_text", "audio_text", "image_audio"}
        if unknown:
            raise ConfigError(f"objectives.contrastive.pairs has unknown pairs {sorted(unknown)}")


def model_audio(audio: AudioFeatureConfig, model: ModelConfig) -> AudioFeatureConfig:
    """The audio front end a run uses: ``audio`` with the audio tower's input shape (n_mels x frames)."""
    shape = {"n_mels": model.audio.n_mels, "frames": model.audio.frames}
    return from_recorded(audio, shape, "the model's", "drop data.audio.{name} (0 follows the model) or set "
                         "model.audio.{name} instead")

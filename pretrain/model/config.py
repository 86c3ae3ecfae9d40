"""The model's typed config. Sizes are named flavors stored as data (``configs/model/<flavor>.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmfuse.schema import ConfigError

CONTRASTIVE_KINDS = ("clip", "siglip")


@dataclass
class VisionConfig:
    """open_clip VisionTransformer settings (the names of open_clip's ``vision_cfg``)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    stem: str = "patch"
    """How pixels become tokens. patch: open_clip's one strided convolution per patch. conv: a stack of 3x3 stride-2
    convolutions ending at the same token grid (Xiao et al. 2021, "Early convolutions help transformers see better"),
    which sees shapes inside a patch far sooner on small images; open_clip has no such stem, so such a release has
    no open_clip files."""
    pool_type: str = "tok"
    """What the image embedding is made from, as open_clip's ``pool_type``: tok, the class token; avg, the mean of
    the patch tokens (after ln_post, as open_clip does), which weighs each object by the area it covers."""


STEMS = ("patch", "conv")
POOL_TYPES = ("tok", "avg")


def conv_stem_channels(width: int, patch_size: int) -> list[int]:
    """Channels of the conv stem's stages, input first: one stride-2 stage per factor of 2 in ``patch_size``,
    doubling up to ``width`` (at least 16), as in Xiao et al. 2021; a 1x1 convolution then maps to ``width``."""
    stages = patch_size.bit_length() - 1
    return [3] + [max(16, width >> (stages - 1 - i)) for i in range(stages)]


@dataclass
class TextConfig:
    """open_clip text transformer settings (the names of open_clip's ``text_cfg``)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass
class AudioTowerConfig:
    """A ViT over log-mel patches: one input channel, ``n_mels`` x ``frames`` input."""

    n_mels: int = 64
    frames: int = 1024
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class FusionConfig:
    """The fusion encoder: text tokens attend to themselves and, across, to the other modalities' tokens."""

    width: int = 512
    layers: int = 2
    heads: int = 8


@dataclass
class DecoderConfig:
    """The light MAE decoder that reconstructs masked image / audio patches."""

    width: int = 256
    layers: int = 2
    heads: int = 8


@dataclass
class ModelConfig:
    RENAMED = {"lock": "freeze"}  # until the next release (mmfuse/config.py)
    flavor: str = "tiny"
    """Named size; its file configs/model/<flavor>.yaml fills the fields below."""
    open_clip_name: str = ""
    """The open_clip architecture the image and text towers match (for loading its released weights), if any."""
    embed_dim: int = 512
    """Width of the shared embedding space."""
    contrastive: str = "clip"
    """clip: learned temperature; siglip: learned temperature and bias."""
    init_logit_scale: float = 2.6592
    """log(1/0.07), CLIP's initial temperature."""
    init_logit_bias: float = -10.0
    """SigLIP's initial bias."""
    quick_gelu: bool = False
    """QuickGELU activations in the image and text towers, as open_clip's ``-quickgelu`` models: OpenAI's released
    CLIP weights need it (they load without it too, into towers that then compute other features)."""
    init_open_clip: str = ""
    """An open_clip checkpoint (release file or trainer checkpoint, local or s3) to initialise the image and text
    towers from; safetensors or weights_only loading only."""
    fused_patch_decoder: bool = False
    """Build the head of objectives.cross_modal_masked.patches. The trainer sets it from that option, and the run's
    config.yaml and releases record it, so export and fine-tuning rebuild the same model."""
    tie_word_embeddings: bool = True
    """The masked-word heads (masked_text's, cross_modal_masked's) score words against the text tower's token
    embedding, read but not trained through them, instead of a vocabulary matrix each: two fewer 49k-row matrices
    to update and reduce every step (the demo's tiny preset: 10.1 M -> 3.7 M parameters, 1.2x the pre-training
    samples per second; docs/pretrain.md). Releases from before this option have untied heads and load as such."""
    freeze: list[str] = field(default_factory=list)
    """Towers to freeze (LiT / ImageBind-style), e.g. [image] or [image, text] to bind a new audio tower (the
    fine-tuning key of the same name does the same there)."""
    image: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self) -> None:
        if self.contrastive not in CONTRASTIVE_KINDS:
            raise ConfigError(f"model.contrastive must be one of {CONTRASTIVE_KINDS}, got {self.contrastive!r}")
        if self.image.pool_type not in POOL_TYPES:
            raise ConfigError(f"model.image.pool_type must be one of {POOL_TYPES}, got {self.image.pool_type!r}")
        if self.image.stem not in STEMS:
            raise ConfigError(f"model.image.stem must be one of {STEMS}, got {self.image.stem!r}")
        p = self.image.patch_size
        if self.image.stem == "conv" and (p < 2 or p & (p - 1)):
            raise ConfigError(f"model.image.stem=conv needs a power-of-two model.image.patch_size (>= 2), got {p}")
        if self.image.image_size % self.image.patch_size:
            raise ConfigError("model.image.image_size must be a multiple of model.image.patch_size")
        a = self.audio
        if a.n_mels % a.patch_size or a.frames % a.patch_size:
            raise ConfigError(f"model.audio.n_mels ({a.n_mels}) and model.audio.frames ({a.frames}) must be multiples of "
                              f"model.audio.patch_size ({a.patch_size})")
        unknown = set(self.freeze) - {"image", "text", "audio"}
        if unknown:
            raise ConfigError(f"model.freeze lists unknown towers {sorted(unknown)}; use image, text, audio")
        for name in ("image", "text", "audio", "fusion", "decoder"):
            part = getattr(self, name)
            if part.width % part.heads:
                raise ConfigError(f"model.{name}.width must be divisible by model.{name}.heads")

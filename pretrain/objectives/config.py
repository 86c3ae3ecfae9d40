"""Objective settings: each objective has a weight (0 turns it off) and its own knobs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ContrastiveConfig:
    weight: float = 1.0
    """Weight of the contrastive loss in the total (0 turns it off)."""
    pairs: dict[str, float] = field(default_factory=lambda: {"image_text": 1.0, "audio_text": 1.0, "image_audio": 1.0})
    """Weight per modality pair; a pair is used only for samples that have both modalities. Switch one off with
    objectives.contrastive.pairs.audio_text=0 (a whole-dict override merges into these defaults)."""
    use_masked_forward: bool = False
    """FLIP: feed the contrastive loss from the masked encoder pass (one pass per modality for both losses)."""
    mask_ratio: float = 0.5
    """Patches dropped for the contrastive pass when use_masked_forward is on and no masked objective sets one."""


@dataclass
class MaskedPatchConfig:
    weight: float = 0.0
    """Weight of this MAE-style loss (0 turns it off)."""
    mask_ratio: float = 0.75
    """Share of patches dropped from the encoder input."""
    norm_targets: bool = True
    """Reconstruct per-patch normalised targets (MAE's norm_pix_loss)."""


@dataclass
class MaskedTextConfig:
    weight: float = 0.0
    """Weight of the masked-token loss (0 turns it off)."""
    mask_prob: float = 0.15
    """Share of caption tokens selected for prediction (BERT: 80% masked, 10% random, 10% kept)."""


@dataclass
class CrossModalMaskedConfig(MaskedTextConfig):
    patches: bool = False
    """Also predict the masked image patches through the fusion encoder from the caption and the audio (FLAVA's
    masked multimodal modelling on the image side), at masked_image.mask_ratio, normalised like masked_image's."""


@dataclass
class ObjectivesConfig:
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    masked_image: MaskedPatchConfig = field(default_factory=MaskedPatchConfig)
    masked_audio: MaskedPatchConfig = field(default_factory=MaskedPatchConfig)
    masked_text: MaskedTextConfig = field(default_factory=MaskedTextConfig)
    cross_modal_masked: CrossModalMaskedConfig = field(default_factory=CrossModalMaskedConfig)

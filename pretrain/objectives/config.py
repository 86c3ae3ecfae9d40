"""Objective settings: each objective has a weight (0 turns it off) and its own knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

PHRASE_SEPARATORS = ("and", ",")
"""Words that split a caption into the phrases whose words a hard negative swaps (and the binding probe's)."""


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
    hard_negatives: bool = False
    """NegCLIP-style hard negative captions (pretrain/objectives/negatives.py): per caption with two or more
    phrases, a copy with one pair of words swapped between them ("a small red circle and a large blue star" for "a
    large red circle and a small blue star"), added to the captions that the images and clips of the rank's batch
    are contrasted with. It teaches which attribute belongs to which object, where a bag of words is enough
    otherwise; the cost is one more text-tower pass per step."""
    phrase_separators: list[str] = field(default_factory=lambda: list(PHRASE_SEPARATORS))
    """Words that split a caption into phrases for hard_negatives."""


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
    masked_context: bool = False
    """Read the image and audio passes that masked_image / masked_audio run (a quarter of the patches at their
    0.75 ratio, FLAVA's choice) instead of the full ones. Full (the default) is what fine-tuning's fusion heads
    read (VQA, classify): pre-trained on a quarter of the patches, the fusion encoder filled a masked colour word
    of a two-object caption from the image alone 33% of the time, 69% with the full passes (chance 17%;
    docs/demo.md). The full passes are the contrastive loss's, so they cost nothing more."""
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
    masked_batch_fraction: float = 1.0
    """Share of each micro-batch that the masked objectives read (its first rows: batches come shuffled); the
    contrastive loss always reads all of it. A masked loss is a mean over its predicted items, so a part of the
    batch estimates it at that part's cost; a contrastive loss needs the whole batch's negatives. configs/pretrain/
    tiny.yaml uses 0.25 (docs/pretrain.md: the same accuracy as 1.0 in three quarters of the time)."""


def fusion_context_ratios(cfg: ObjectivesConfig) -> dict[str, float]:
    """The mask ratio of the image and audio passes the cross-modal masked objective's fusion encoder reads: 0 (the
    full passes), or with ``masked_context`` the masked objectives' ratios where those run."""
    cross = cfg.cross_modal_masked
    return {modality: masked.mask_ratio if cross.masked_context and masked.weight > 0 else 0.0
            for modality, masked in (("image", cfg.masked_image), ("audio", cfg.masked_audio))}


PAIR_MODALITIES = {"image_text": ("image", "text"), "audio_text": ("audio", "text"), "image_audio": ("image", "audio")}


def read_modalities(cfg: ObjectivesConfig) -> set[str]:
    """The modalities some enabled objective reads: the training loader decodes only these."""
    read: set[str] = set()
    if cfg.contrastive.weight > 0:
        read |= {m for pair, weight in cfg.contrastive.pairs.items() if weight > 0 for m in PAIR_MODALITIES[pair]}
    for name, modality in (("masked_image", "image"), ("masked_audio", "audio"), ("masked_text", "text")):
        if getattr(cfg, name).weight > 0:
            read.add(modality)
    if cfg.cross_modal_masked.weight > 0:
        read |= {"text", "image", "audio"}
    return read


def missing_modalities(cfg: ObjectivesConfig, found: set[str]) -> dict[str, str]:
    """Enabled objectives that ``found`` (the data's modalities) cannot feed, with what each one lacks. Such an
    objective would log 0 at every step and train nothing."""
    lacking: dict[str, str] = {}
    if cfg.contrastive.weight > 0:
        pairs = [pair for pair, weight in cfg.contrastive.pairs.items() if weight > 0]
        if not any(set(PAIR_MODALITIES[pair]) <= found for pair in pairs):
            lacking["contrastive"] = "a pair with both modalities (" + ", ".join(pairs) + ")"
    for name, modality in (("masked_image", "image"), ("masked_audio", "audio"), ("masked_text", "text")):
        if getattr(cfg, name).weight > 0 and modality not in found:
            lacking[name] = modality
    if cfg.cross_modal_masked.weight > 0 and not ("text" in found and found & {"image", "audio"}):
        lacking["cross_modal_masked"] = "text and image or audio"
    return lacking

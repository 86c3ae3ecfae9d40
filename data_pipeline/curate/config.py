"""``mmfuse curate``'s settings (``configs/curate/default.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import MembersConfig
from mmfuse.config import MISSING, ConfigError


@dataclass
class CurateInputConfig:
    path: str = MISSING
    """The sharded dataset: a folder or object-store prefix with sizes.json (``mmfuse shard``), an img2dataset
    folder, a brace pattern or a .tar."""


@dataclass
class CurateOutputConfig:
    path: str = MISSING
    """Folder (local or s3://) for index.parquet, REPORT.md, curate.json and the per-shard scans (scan/)."""
    shards: str = ""
    """Also write the kept samples as a dataset of their own here (local or s3://): shards of the original names
    holding only the kept samples, members copied byte for byte, with sizes.json, for readers without
    ``data.keep`` (plain WebDataset, open_clip's loader). Empty: the index alone."""


@dataclass
class CaptionRules:
    """Captions a sample is dropped for (reason ``caption_*``); every rule off at its 0 / empty value."""

    min_words: int = 1
    """Fewer words than this: ``caption_short`` (an empty or missing caption has 0)."""
    max_words: int = 0
    """More words than this: ``caption_long``. 0: no limit."""
    max_repeat: float = 0.0
    """The most frequent word's share of a caption above this (spam such as "sale sale sale sale"):
    ``caption_repetitive``. Captions of fewer than 4 words are exempt. 0: off."""
    boilerplate: list[str] = field(default_factory=list)
    """Case-insensitive phrases that drop a caption holding one ("image not found", "stock photo"):
    ``caption_boilerplate``."""


@dataclass
class DedupRules:
    exact: bool = True
    """Drop a sample whose image bytes equal an earlier kept sample's: ``duplicate``."""
    near: bool = True
    """Drop a sample whose image's perceptual hash (64-bit DCT hash, imagehash.phash) is within ``max_distance``
    bits of an earlier kept sample's (re-encoded, resized or lightly edited copies): ``near_duplicate``."""
    max_distance: int = 4
    """Hamming distance (of 64 bits) that still counts as the same picture."""


@dataclass
class SimilarityRules:
    """The scorer's image-text cosine similarity (CLIP score; audio-text for audio-only samples), as DataComp filters
    by: ``low_similarity``. Samples without both sides of the pair are not judged by it."""

    min: float = -1.0
    """Drop a sample scoring below this. -1: off."""
    top_fraction: float = 1.0
    """Keep this share of the samples still kept, by highest score (DataComp's best simple baseline keeps about
    0.3). 1: off."""


@dataclass
class SemanticDedupRules:
    """SemDeDup (Abbas et al. 2023) on the scorer's embeddings: k-means (faiss) groups the samples still kept, and
    within a cluster a sample whose embedding is within ``threshold`` cosine of one kept before it is dropped:
    ``semantic_duplicate``. "Before" ranks each cluster by the pair's own similarity (the sample closest to its
    caption is kept), then dataset order."""

    clusters: int = 0
    """k of k-means (SemDeDup used 50,000 for LAION's 440M; about sqrt(samples) is a fair start). 0: off."""
    threshold: float = 0.95
    """Cosine similarity at or above which two samples count as the same picture in other pixels."""
    modality: str = "image"
    """Which embedding is compared: image or audio."""
    iterations: int = 20
    """k-means iterations."""
    seed: int = 0
    """k-means seed: the same seed and scans give the same subset."""


@dataclass
class BalanceRules:
    """MetaCLIP's balancing (Xu et al. 2023), made exact: captions are matched against a list of concepts (whole
    words, case-insensitive), and no concept keeps more than ``max_per_concept`` samples. A sample whose concepts
    are all tail concepts (at most ``max_per_concept`` matches each) is kept; the others, in a seeded random order
    (those that also match a tail concept first), are kept while each of their head concepts has room:
    ``concept_over_cap``."""

    concepts: list[str] = field(default_factory=list)
    """The concept list ("red circle", "golden retriever", ...)."""
    concepts_file: str = ""
    """A text file (local or s3://) of one concept per line, added to ``concepts`` (MetaCLIP's is 500,000 WordNet
    synsets and Wikipedia titles)."""
    max_per_concept: int = 0
    """t: at most this many kept samples per concept (MetaCLIP: 20,000 for 400M pairs). 0: off."""
    unmatched: str = "keep"
    """A caption matching no concept: keep, or drop (``no_concept``; MetaCLIP's pool holds only matched pairs)."""
    seed: int = 0
    """Which of a head concept's samples are kept: the same seed and scans give the same subset."""


@dataclass
class CurateConfig:
    """Score, de-duplicate and filter a sharded dataset into a subset index for ``data.keep``."""

    input: CurateInputConfig = field(default_factory=CurateInputConfig)
    output: CurateOutputConfig = field(default_factory=CurateOutputConfig)
    captions: CaptionRules = field(default_factory=CaptionRules)
    dedup: DedupRules = field(default_factory=DedupRules)
    scorer: str = ""
    """A model whose embeddings score every sample: a release (``mmfuse export``'s folder, local or s3://), or an
    open_clip weights file (``open_clip_model.safetensors``, ``.bin``, a trainer's ``epoch_N.pt``) with
    ``open_clip_model``. The scans then hold image / text / audio embeddings (fp16) and image-text / audio-text
    similarities, read by ``similarity`` and ``semantic_dedup`` (an open_clip model has no audio tower: audio-text
    stays unscored)."""
    open_clip_model: str = ""
    """The architecture of an open_clip ``scorer``: an open_clip model name (ViT-B-32) or its open_clip_config.json,
    as in fine-tuning."""
    scorer_batch_size: int = 64
    """Samples the scorer embeds at once."""
    similarity: SimilarityRules = field(default_factory=SimilarityRules)
    semantic_dedup: SemanticDedupRules = field(default_factory=SemanticDedupRules)
    balance: BalanceRules = field(default_factory=BalanceRules)
    members: MembersConfig = field(default_factory=MembersConfig)
    """Which tar members hold the image and the caption (as in the loader's data.members)."""
    processes: int = 2
    """Processes scanning shards in parallel; 1 scans in this process."""
    max_image_pixels: int = 89_478_485
    """Images whose header claims more pixels are not decoded (decompression bombs): ``image_unreadable``."""
    sheet_samples: int = 12
    """Samples per outcome (kept, and each reason) drawn onto a contact sheet, OUT/sheets/<outcome>.png, linked
    from REPORT.md. 0: none."""
    progress: bool = True
    """Show a progress bar while scanning."""

    def validate(self) -> None:
        rules = self.captions
        if rules.min_words < 0 or rules.max_words < 0 or not 0 <= rules.max_repeat <= 1:
            raise ConfigError("captions.min_words and captions.max_words must be >= 0, captions.max_repeat in [0, 1]")
        if rules.max_words and rules.max_words < rules.min_words:
            raise ConfigError(f"captions.max_words={rules.max_words} is below captions.min_words={rules.min_words}")
        if not 0 <= self.dedup.max_distance <= 32:
            raise ConfigError(f"dedup.max_distance must be within 0..32 bits (of 64), got {self.dedup.max_distance}")
        if self.processes < 1 or self.scorer_batch_size < 1 or self.sheet_samples < 0:
            raise ConfigError("processes and scorer_batch_size must be at least 1, sheet_samples at least 0")
        rules = self.similarity
        if not -1 <= rules.min <= 1 or not 0 < rules.top_fraction <= 1:
            raise ConfigError(f"similarity.min must be in [-1, 1] and similarity.top_fraction in (0, 1], got {rules.min} "
                              f"and {rules.top_fraction}")
        if (rules.min > -1 or rules.top_fraction < 1) and not self.scorer:
            raise ConfigError("similarity.min / similarity.top_fraction read a model's scores: set scorer=RELEASE (an "
                              "mmfuse export folder, or an open_clip weights file with open_clip_model)")
        semantic = self.semantic_dedup
        if semantic.clusters < 0 or not -1 <= semantic.threshold <= 1 or semantic.iterations < 1:
            raise ConfigError("semantic_dedup.clusters must be >= 0, semantic_dedup.threshold in [-1, 1] and "
                              f"semantic_dedup.iterations >= 1, got {semantic.clusters}, {semantic.threshold} and "
                              f"{semantic.iterations}")
        if semantic.modality not in ("image", "audio"):
            raise ConfigError(f"semantic_dedup.modality={semantic.modality!r}: image or audio")
        if self.open_clip_model and not self.scorer:
            raise ConfigError("open_clip_model names the architecture of an open_clip scorer: set scorer=WEIGHTS too")
        if semantic.clusters and not self.scorer:
            raise ConfigError("semantic_dedup compares a model's embeddings: set scorer=RELEASE (an mmfuse export "
                              "folder, or an open_clip weights file with open_clip_model), or semantic_dedup.clusters=0")
        balance = self.balance
        if balance.max_per_concept < 0 or balance.unmatched not in ("keep", "drop"):
            raise ConfigError(f"balance.max_per_concept must be >= 0 and balance.unmatched keep or drop, got "
                              f"{balance.max_per_concept} and {balance.unmatched!r}")
        if balance.max_per_concept and not (balance.concepts or balance.concepts_file):
            raise ConfigError("balance.max_per_concept needs a concept list: balance.concepts=[...] or "
                              "balance.concepts_file=FILE (one concept per line)")

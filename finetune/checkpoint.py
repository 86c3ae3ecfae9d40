"""What fine-tuning starts from: one of our release folders, or an open_clip checkpoint file.

Both load safely (safetensors, or ``torch.load(weights_only=True)`` for open_clip's ``.bin`` / ``.pt``; there is
no fallback to unsafe loading). An open_clip file needs its architecture (``open_clip_model``: a model name or a
JSON config); its image and text towers load into our model, the audio tower and heads start fresh. A checkpoint
whose config does not match what was asked for is refused with the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config import AudioFeatureConfig, from_recorded
from mmfuse.storage import filesystem
from mmfuse.redact import redact
from finetune.config import FinetuneConfig
from pretrain.model.pretrained import WEIGHT_SUFFIXES, load_open_clip_model, open_clip_architecture
from mmfuse.schema import ConfigError
from mmfuse.commits import MARKER, committed_tags



@dataclass
class Checkpoint:
    """Where the weights came from, for the results card."""

    path: str
    kind: str  # "release" or "open_clip"
    sha256: str
    flavor: str
    templates: list[str] = field(default_factory=list)  # the zero-shot prompts a release was evaluated with
    audio: dict = field(default_factory=dict)  # the audio front end the model was trained on (FRONT_END fields)

    def zeroshot_templates(self, configured: list[str]) -> tuple[list[str], str]:
        """(templates, where they came from): the configured ones, else the release's, else CLIP's."""
        from pretrain.evaluate import DEFAULT_TEMPLATES

        if configured:
            return list(configured), "config"
        if self.templates:
            return list(self.templates), "release (pre-training eval.templates)"
        return list(DEFAULT_TEMPLATES), "default (CLIP-style)"


def audio_front_end(configured: AudioFeatureConfig, trained_on: dict) -> AudioFeatureConfig:
    """``configured`` (data.audio) with the front end the checkpoint's model was trained on: log-mels computed any
    other way are inputs it never saw, so a field set to something else is an error that names both values."""
    return from_recorded(configured, trained_on, "the checkpoint's", "drop data.audio.{name} (the model was trained "
                         "with {want}, recorded in its release)")


def check_checkpoint(cfg: FinetuneConfig) -> str:
    """Fail fast (before any process starts) on a checkpoint that cannot be what the config asks for."""
    fs, root = filesystem(cfg.checkpoint)
    if fs.isdir(root):
        from pretrain.release import read_release_config, release_front_end

        release = read_release_config(cfg.checkpoint, key="checkpoint")
        flavor = release.get("model", {}).get("flavor", "")
        if cfg.flavor and flavor != cfg.flavor:
            raise ConfigError(f"checkpoint {redact(cfg.checkpoint)!r} is a {flavor!r} model, but flavor={cfg.flavor!r} was "
                              "requested")
        audio_front_end(cfg.data.audio, release_front_end(release))
        return "release"
    if not fs.exists(root):
        raise ValueError(f"checkpoint {redact(cfg.checkpoint)!r} does not exist")
    if not root.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"checkpoint {redact(cfg.checkpoint)!r}: expected a release folder or an open_clip weights file "
                         f"({', '.join(WEIGHT_SUFFIXES)})")
    if not cfg.open_clip_model:
        raise ConfigError(f"checkpoint {redact(cfg.checkpoint)!r} is an open_clip weights file: set open_clip_model to its "
                          "architecture (an open_clip model name such as ViT-B-16, or its open_clip_config.json)")
    open_clip_architecture(cfg.open_clip_model)  # raises on an unknown or unsupported architecture
    return "open_clip"


def load_checkpoint(cfg: FinetuneConfig):
    """(MultimodalModel with the checkpoint's weights, Checkpoint)."""
    from pretrain.release import load_release

    kind = check_checkpoint(cfg)
    if kind == "release":
        from pretrain.release import release_front_end

        model, release = load_release(cfg.checkpoint)
        digest = _sha256(cfg.checkpoint.rstrip("/") + "/model.safetensors")
        return model, Checkpoint(cfg.checkpoint, kind, digest, release["model"]["flavor"],
                                 list(release.get("zeroshot", {}).get("templates", [])), release_front_end(release))
    model, front_end = load_open_clip_model(cfg.checkpoint, cfg.open_clip_model, cfg.flavor)
    return model, Checkpoint(cfg.checkpoint, kind, _sha256(cfg.checkpoint), model.cfg.flavor, audio=front_end)


def _sha256(path: str) -> str:
    fs, inner = filesystem(path)
    digest = hashlib.sha256()
    with fs.open(inner, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_resume(cfg: FinetuneConfig) -> Path | None:
    """The checkpoint to resume from, checked before any work starts."""
    resume = cfg.run.resume
    if resume == "none":
        return None
    if resume == "auto":
        root = Path(cfg.run.dir) / "checkpoints"
        found = committed_tags(root)
        return root / found[-1] if found else None
    folder = Path(resume)
    if not (folder / MARKER).is_file():
        raise ValueError(f"run.resume={resume!r} is not a committed fine-tuning checkpoint (no {MARKER} marker)")
    return folder

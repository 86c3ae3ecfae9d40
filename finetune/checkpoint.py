"""What fine-tuning starts from: one of our release folders, or an open_clip checkpoint file.

Both load safely (safetensors, or ``torch.load(weights_only=True)`` for open_clip's ``.bin`` / ``.pt``; there is
no fallback to unsafe loading). An open_clip file needs its architecture (``open_clip_model``: a model name or a
JSON config); its image and text towers load into our model, the audio tower and heads start fresh. A checkpoint
whose config does not match what was asked for is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config import LEGACY_FRONT_END, AudioFeatureConfig, from_recorded
from mmfuse.storage import filesystem, join
from mmfuse.redact import redact
from finetune.config import FinetuneConfig
from mmfuse.config import CONFIG_ROOT
from mmfuse.schema import ConfigError
from mmfuse.commits import MARKER, committed_tags

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
        if not fs.exists(join(root, "config.json")):
            raise ValueError(f"checkpoint {redact(cfg.checkpoint)!r} is a folder without config.json: not an mmfuse release")
        if not fs.exists(join(root, "model.safetensors")):
            raise ValueError(f"checkpoint {redact(cfg.checkpoint)!r} has config.json but no model.safetensors: an "
                             "unfinished or partly copied release")
        release = json.loads(fs.cat_file(join(root, "config.json")))
        flavor = release.get("model", {}).get("flavor", "")
        if cfg.flavor and flavor != cfg.flavor:
            raise ConfigError(f"checkpoint {redact(cfg.checkpoint)!r} is a {flavor!r} model, but flavor={cfg.flavor!r} was "
                              "requested")
        from pretrain.release import release_front_end

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
    from pretrain.model import MultimodalModel
    from pretrain.model.pretrained import load_open_clip_weights

    model_cfg = model_config_for_open_clip(cfg.open_clip_model, cfg.flavor)
    model = MultimodalModel(model_cfg)
    load_open_clip_weights(model.clip, cfg.checkpoint)  # shape mismatches name the parameter
    # open_clip has no audio: the new audio tower gets the loader's default front end at its own mel shape.
    front_end = {**LEGACY_FRONT_END, "n_mels": model_cfg.audio.n_mels, "frames": model_cfg.audio.frames}
    return model, Checkpoint(cfg.checkpoint, kind, _sha256(cfg.checkpoint), model_cfg.flavor, audio=front_end)


def open_clip_architecture(name: str) -> dict:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) from a model name or a JSON file."""
    if name.endswith(".json"):
        fs, path = filesystem(name)
        if not fs.exists(path):
            raise ValueError(f"open_clip_model {redact(name)!r} does not exist")
        config = json.loads(fs.cat_file(path))
        config = config.get("model_cfg", config)  # open_clip_config.json wraps it with the preprocessing
    else:
        import open_clip

        config = open_clip.get_model_config(name)
        if config is None:
            raise ConfigError(f"open_clip_model {name!r} is not an open_clip model name (see open_clip.list_models()) "
                              "nor a .json config")
    unsupported = [k for k in ("timm_model_name", "hf_model_name") for part in ("vision_cfg", "text_cfg")
                   if config.get(part, {}).get(k)]
    if unsupported or "vision_cfg" not in config or "text_cfg" not in config:
        raise ConfigError(f"open_clip_model {name!r}: only open_clip's own ViT image and text transformers are supported "
                          f"(this config uses {unsupported or 'another layout'})")
    return config


def model_config_for_open_clip(name: str, flavor: str = ""):
    """Our ModelConfig whose image and text towers are the open_clip architecture ``name``. The audio tower (new)
    comes from ``flavor`` if given, else mirrors the image tower's size."""
    from mmfuse.config import load_config
    from pretrain.model import ModelConfig

    config = open_clip_architecture(name)
    vision, text = config["vision_cfg"], config["text_cfg"]
    base = load_config(ModelConfig, [str(CONFIG_ROOT / "model" / f"{flavor}.yaml")]) if flavor else ModelConfig(flavor="")
    width = vision["width"]
    heads = width // vision.get("head_width", 64)
    base.embed_dim = config["embed_dim"]
    base.open_clip_name = "" if name.endswith(".json") else name
    base.image.image_size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    base.image.patch_size, base.image.width, base.image.layers = vision["patch_size"], width, vision["layers"]
    base.image.heads, base.image.mlp_ratio = heads, vision.get("mlp_ratio", 4.0)
    base.text.context_length = text.get("context_length", 77)
    base.text.vocab_size = text.get("vocab_size", 49408)
    base.text.width, base.text.heads, base.text.layers = text["width"], text.get("heads", 8), text["layers"]
    base.text.mlp_ratio = text.get("mlp_ratio", 4.0)
    if not flavor:
        base.audio.width, base.audio.layers, base.audio.heads = width, vision["layers"], heads
        base.fusion.width, base.fusion.heads = text["width"], text.get("heads", 8)
    if "init_logit_bias" in config:
        base.contrastive = "siglip"
    base.validate()
    return base


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

"""Initialising the image and text towers from an open_clip checkpoint, safely (torch is imported on use: finetune
and curate check an open_clip architecture before any process starts).

Accepted: open_clip's release files (a state dict as ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``) and its trainer's checkpoints (``{"epoch", "name", "state_dict", "optimizer"}``
with ``module.`` prefixes). Safetensors are read as tensors; anything else only with ``torch.load(...,
weights_only=True)``, which refuses arbitrary pickled objects. There is no fallback to unsafe loading.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING

from mmfuse.config import CONFIG_ROOT
from mmfuse.redact import redact
from mmfuse.schema import ConfigError
from mmfuse.storage import filesystem, is_local

if TYPE_CHECKING:
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""What an open_clip weights file ends with (a release is a folder)."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local or remote file, never unpickling arbitrary objects."""
    import torch
    from safetensors.torch import load_file

    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise ValueError(f"checkpoint {redact(path)!r} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        local = inner if is_local(path) else os.path.join(tmp, os.path.basename(inner))
        if not is_local(path):
            fs.get_file(inner, local)
        if local.endswith(".safetensors"):
            state = load_file(local)
        else:
            try:
                state = torch.load(local, map_location="cpu", weights_only=True)
            except Exception as err:  # weights_only refuses arbitrary objects with UnpicklingError and others
                raise ValueError(f"{redact(path)!r} cannot be loaded safely (weights_only=True): {type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip trainer checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{redact(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_open_clip_weights(clip: torch.nn.Module, path: str) -> None:
    """Copy an open_clip CLIP state dict into our ``clip`` submodule; shape mismatches name the parameter."""
    state = read_state_dict(path)
    own = clip.state_dict()
    for name in ("logit_scale", "logit_bias"):
        if name in state and name in own:
            state[name] = state[name].reshape(own[name].shape)  # 0-dim in open_clip, [1] here
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{redact(path)!r} does not match model.flavor's image/text towers: " + "; ".join(mismatched[:5]))
    missing = [k for k in own if k not in state and k != "logit_bias"]
    if any(k.startswith("visual.conv1.layers.") for k in missing):
        raise ValueError(f"{redact(path)!r} is an open_clip checkpoint, whose image towers have the patch stem, but "
                         "model.image.stem=conv: set model.image.stem=patch to load it")
    if missing:
        raise ValueError(f"{redact(path)!r} lacks {len(missing)} tower weights (e.g. {missing[:3]}): not an open_clip "
                         "CLIP checkpoint of this architecture")
    clip.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


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
    unsupported = [k for k in ("timm_model_name", "hf_model_name", "attentional_pool") for part in ("vision_cfg", "text_cfg")
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
    base.image.pool_type = "avg" if vision.get("global_average_pool") else vision.get("pool_type", "tok")
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


def load_open_clip_model(weights: str, architecture: str, flavor: str = ""):
    """(MultimodalModel whose image and text towers hold the open_clip checkpoint ``weights`` of ``architecture``,
    the audio front end its new audio tower is built for). open_clip has no audio: that tower and the heads start
    fresh, at the loader's default front end and the tower's own mel shape."""
    from data_pipeline.config import LEGACY_FRONT_END
    from pretrain.model import MultimodalModel

    model_cfg = model_config_for_open_clip(architecture, flavor)
    model = MultimodalModel(model_cfg)
    load_open_clip_weights(model.clip, weights)  # shape mismatches name the parameter
    return model, {**LEGACY_FRONT_END, "n_mels": model_cfg.audio.n_mels, "frames": model_cfg.audio.frames}

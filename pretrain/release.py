"""Release checkpoints: the format fine-tuning and open_clip load.

A release folder (local or object store) holds:
- ``model.safetensors``: every weight of the multimodal model;
- ``config.json``: the model config and the preprocessing that goes with it (image size, mean/std, tokenizer,
  the run's whole audio front end: ``preprocess.audio``, which fine-tuning enforces), plus where it came from;
- ``open_clip_model.safetensors`` + ``open_clip_config.json``: the image-text part in open_clip's own format, so
  ``open_clip.create_model_and_transforms("local-dir:RELEASE")`` loads it (temperatures squeezed back to 0-dim);
  absent when the image tower has a convolutional stem (``model.image.stem=conv``), which open_clip cannot build;
- ``README.md``: the model card (``pretrain.card``): parameters per tower, training data (redacted), steps and
  compute, objectives, the last in-loop evaluation beside the untrained model and chance, how to load it, the
  preprocessing and license. Written from the run folder by ``mmfuse export``; without one, what the weights and
  config.json say, the rest marked as not recorded.

Every file is staged first and ``config.json`` is moved in last: a folder with it is a whole release.

Only safetensors and JSON: loading a release never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.config import FRONT_END, LEGACY_FRONT_END, AudioFeatureConfig
from mmfuse.storage import commit_file, filesystem, is_local, join
from mmfuse.redact import redact, redact_values
from mmfuse.config import to_dict
from pretrain.card import ReleaseInfo, RunRecord, model_card
from pretrain.model.config import ModelConfig

if TYPE_CHECKING:  # torch is imported where weights are touched: reading a release's config.json needs none of it
    import torch

    from pretrain.model import MultimodalModel

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
FILES = ("model.safetensors", "config.json", "README.md", "open_clip_model.safetensors", "open_clip_config.json")


def release_config(cfg: ModelConfig, source: dict, templates: list[str] | None = None,
                   audio: AudioFeatureConfig | None = None, info: ReleaseInfo | None = None) -> dict:
    """``templates``: the zero-shot prompts the run evaluated with (phrased like its captions). ``audio``: the
    run's audio settings as its loader used them (default: the loader's defaults at the model's mel shape).
    ``info``: license and description (default: unspecified)."""
    audio = audio or AudioFeatureConfig(n_mels=cfg.audio.n_mels, frames=cfg.audio.frames)
    assert (audio.n_mels, audio.frames) == (cfg.audio.n_mels, cfg.audio.frames), "the mel shape is the model's input"
    return {
        "format": "mmfuse-release/1",
        "model": to_dict(cfg),
        "preprocess": {
            "image_size": cfg.image.image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
            "tokenizer": "open_clip.SimpleTokenizer", "context_length": cfg.text.context_length,
            "audio": to_dict(audio),
        },
        "source": source,
        "zeroshot": {"templates": list(templates or [])},
        "release": redact_values(dataclasses.asdict(info or ReleaseInfo())),  # free text: no URL keeps a secret
    }


def open_clip_state_dict(model: MultimodalModel) -> dict[str, torch.Tensor]:
    state = {name.removeprefix("clip."): tensor for name, tensor in model.state_dict().items() if name.startswith("clip.")}
    state["logit_scale"] = state["logit_scale"].reshape(())
    if "logit_bias" in state:
        state["logit_bias"] = state["logit_bias"].reshape(())
    return state


def save_release(state: dict[str, torch.Tensor], cfg: ModelConfig, output: str, source: dict,
                 templates: list[str] | None = None, audio: AudioFeatureConfig | None = None,
                 run: RunRecord | None = None, info: ReleaseInfo | None = None) -> None:
    """Write a release from a full (consolidated) state dict of ``MultimodalModel``. ``run``: what the run folder
    says about how it was trained, for the model card (``mmfuse export`` reads it; None: not recorded there)."""
    from safetensors.torch import save_file

    from pretrain.model import MultimodalModel
    from pretrain.model.multimodal import PARTS
    from pretrain.model.towers import open_clip_config

    model = MultimodalModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    contiguous = {k: v.contiguous() for k, v in model.state_dict().items()}
    open_clip_cfg = {"model_cfg": open_clip_config(cfg),
                     "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}}
    with tempfile.TemporaryDirectory(prefix="mmfuse-release-") as tmp:
        staged = Path(tmp)
        save_file(contiguous, staged / "model.safetensors", metadata={"format": "pt"})
        names = ["model.safetensors"]
        if cfg.image.stem == "patch":  # open_clip has no convolutional stem: such an image tower is ours alone
            save_file({k: v.contiguous() for k, v in open_clip_state_dict(model).items()},
                      staged / "open_clip_model.safetensors", metadata={"format": "pt"})
            (staged / "open_clip_config.json").write_text(json.dumps(open_clip_cfg, indent=1))
            names += ["open_clip_model.safetensors", "open_clip_config.json"]
        release = release_config(cfg, source, templates, audio, info)
        parameters = {part: sum(p.numel() for p in model.part_parameters(part)) for part in PARTS}
        (staged / "README.md").write_text(model_card(release, parameters, output, run, info), encoding="utf-8")
        (staged / "config.json").write_text(json.dumps(release, indent=1))
        names += ["README.md", "config.json"]
        fs, root = filesystem(output)
        if is_local(output):
            fs.makedirs(root, exist_ok=True)
        # A release written over an older one keeps none of its files (an open_clip pair beside a conv-stem model
        # would load the old weights in open_clip).
        for name in set(FILES) - set(names):
            if fs.exists(join(root, name)):
                fs.rm(join(root, name))
        # config.json last: a reader that finds it finds the weights too.
        for name in names:
            if is_local(output):
                shutil.move(staged / name, Path(root) / name)  # a rename when /tmp and the output share a disk
            else:
                commit_file(str(staged / name), fs, join(root, name))


def read_release_config(path: str, key: str = "") -> dict:
    """A release folder's config.json, checked without reading the weights (no torch): a ValueError that names the
    folder, after ``key=`` when given, and what it lacks."""
    fs, root = filesystem(path)
    named = f"{key}={redact(path)!r}" if key else repr(redact(path))
    if not fs.exists(join(root, "config.json")):
        raise ValueError(f"{named} is not a release folder (no config.json): give the folder `mmfuse export` wrote")
    try:
        release = json.loads(fs.cat_file(join(root, "config.json")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        release = None
    if not (isinstance(release, dict) and str(release.get("format", "")).startswith("mmfuse-release/")):
        raise ValueError(f"{named}: config.json is not an mmfuse release config")
    if not fs.exists(join(root, "model.safetensors")):
        raise ValueError(f"{named} has config.json but no model.safetensors: an unfinished or partly copied release")
    return release


def load_release(path: str) -> tuple[MultimodalModel, dict]:
    """(model with weights, release config) from a release folder, local or on an object store."""
    from safetensors.torch import load_file

    from pretrain.model import MultimodalModel

    release = read_release_config(path)
    fs, root = filesystem(path)
    model = MultimodalModel(_model_config(release["model"]))
    with tempfile.TemporaryDirectory() as tmp:
        local = join(root, "model.safetensors") if is_local(path) else _download(fs, join(root, "model.safetensors"), tmp)
        state = load_file(local)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{redact(path)}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, release


def release_front_end(release: dict) -> dict:
    """The audio front end (``FRONT_END`` fields) a release's model was trained on. Releases from before it was
    recorded in full wrote only the mel shape and the settings of ``LEGACY_FRONT_END``, which the rest default to."""
    recorded = release.get("preprocess", {}).get("audio", {})
    shape = {"n_mels": release["model"]["audio"]["n_mels"], "frames": release["model"]["audio"]["frames"]}
    return {name: recorded.get(name, {**LEGACY_FRONT_END, **shape}[name]) for name in FRONT_END}


def _model_config(values: dict) -> ModelConfig:
    """The typed model config from a release's JSON (unknown keys are an error, as everywhere)."""
    from omegaconf import OmegaConf

    from mmfuse.config import apply_renames, renamed_keys

    base = OmegaConf.structured(ModelConfig)
    # Releases from before tie_word_embeddings have a vocabulary matrix in each masked-word head.
    values = {**values, "tie_word_embeddings": values.get("tie_word_embeddings", False)}
    values = apply_renames(OmegaConf.create(values), renamed_keys(base), "the release's config.json")
    cfg = OmegaConf.to_object(OmegaConf.merge(base, values))
    cfg.validate()
    return cfg


def _download(fs, remote: str, folder: str) -> str:
    local = os.path.join(folder, remote.rsplit("/", 1)[-1])
    fs.get_file(remote, local)
    return local

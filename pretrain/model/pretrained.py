"""Initialising the image and text towers from an open_clip checkpoint, safely.

Accepted: open_clip's release files (a state dict as ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``) and its trainer's checkpoints (``{"epoch", "name", "state_dict", "optimizer"}``
with ``module.`` prefixes). Safetensors are read as tensors; anything else only with ``torch.load(...,
weights_only=True)``, which refuses arbitrary pickled objects. There is no fallback to unsafe loading.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import load_file

from mmfuse.storage import filesystem, is_local

from mmfuse.redact import redact


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local or remote file, never unpickling arbitrary objects."""
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

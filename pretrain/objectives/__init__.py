"""Pre-training objectives: one small module each, looked up by name in ``OBJECTIVES``.

The registry below is the only list of objective names (config validation, FLOP accounting, the trainer's loss
weights ask it); the modules with tensors are imported on first lookup, so reading a config never imports torch.
Each objective has a sub-config of the same name in ``ObjectivesConfig``.
"""

from mmfuse.registry import Registry
from pretrain.objectives.config import ObjectivesConfig

OBJECTIVES = Registry("objective")
OBJECTIVES.add("contrastive", "pretrain.objectives.contrastive:Contrastive")
OBJECTIVES.add("masked_image", "pretrain.objectives.masked:MaskedImage")
OBJECTIVES.add("masked_audio", "pretrain.objectives.masked:MaskedAudio")
OBJECTIVES.add("masked_text", "pretrain.objectives.masked:MaskedText")
OBJECTIVES.add("cross_modal_masked", "pretrain.objectives.masked:CrossModalMasked")

__all__ = ["OBJECTIVES", "DistContext", "Forward", "ObjectivesConfig", "build_objectives", "objective_weights"]
_LAZY = {"Forward": "pretrain.objectives.base", "DistContext": "pretrain.objectives.gather"}


def objective_weights(cfg: ObjectivesConfig) -> dict[str, float]:
    """Each registered objective's weight in the total loss (0 = off), in registry order."""
    return {name: getattr(cfg, name).weight for name in OBJECTIVES}


def build_objectives(cfg: ObjectivesConfig) -> list:
    """The objectives with a weight above 0, in registry order."""
    active = [OBJECTIVES[name](getattr(cfg, name), cfg) for name, weight in objective_weights(cfg).items() if weight > 0]
    if not active:
        raise ValueError("every objective has weight 0: set objectives.<name>.weight > 0 for at least one")
    return active


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

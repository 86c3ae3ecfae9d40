"""Pre-training objectives: one small module each, looked up by name in a registry.

The modules with tensors are imported on first use, so reading a config (``pretrain.objectives.config``) never
imports torch.
"""

from pretrain.objectives.config import ObjectivesConfig

__all__ = ["REGISTRY", "DistContext", "Forward", "ObjectivesConfig", "build_objectives"]
_LAZY = {"REGISTRY": "pretrain.objectives.base", "Forward": "pretrain.objectives.base",
         "build_objectives": "pretrain.objectives.base", "DistContext": "pretrain.objectives.gather"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Pre-training objectives: one small module each, looked up by name in a registry."""

from pretrain.objectives.base import REGISTRY, Forward, build_objectives
from pretrain.objectives.config import ObjectivesConfig
from pretrain.objectives.gather import DistContext

__all__ = ["REGISTRY", "DistContext", "Forward", "ObjectivesConfig", "build_objectives"]

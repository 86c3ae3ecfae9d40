"""Single-device model code: no process groups, DeepSpeed or Accelerate in this package (parallelism is applied from outside)."""

from pretrain.model.config import ModelConfig
from pretrain.model.multimodal import MultimodalModel

__all__ = ["ModelConfig", "MultimodalModel"]

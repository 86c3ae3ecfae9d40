"""Single-device model code: no torch.distributed, DeepSpeed or Accelerate here."""

from pretrain.model.config import ModelConfig
from pretrain.model.multimodal import MultimodalModel

__all__ = ["ModelConfig", "MultimodalModel"]

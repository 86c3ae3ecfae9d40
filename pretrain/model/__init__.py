"""Single-device model code: no process groups, DeepSpeed or Accelerate in this package (parallelism is applied from outside).

``MultimodalModel`` is imported on first use, so reading a config (``pretrain.model.config``) never imports torch.
"""

from pretrain.model.config import ModelConfig

__all__ = ["ModelConfig", "MultimodalModel"]


def __getattr__(name: str):
    if name == "MultimodalModel":
        from pretrain.model.multimodal import MultimodalModel

        return MultimodalModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The optimizer rules pre-training and fine-tuning share: which parameters are not decayed, and the learning-rate
schedule (linear warmup, then cosine to a floor, or constant)."""

from __future__ import annotations

import math

import torch

_NO_DECAY_WORDS = ("embedding", "logit_", "pos_embed", "cls_token", "position", "mask_token")


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norms, biases, embeddings (token, positional, class, mask) and temperatures are not decayed."""
    lowered = name.lower()
    return param.ndim < 2 or any(word in lowered for word in _NO_DECAY_WORDS)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at ``step`` (0-based): linear warmup over ``warmup_steps``, then
    cosine from 1 to ``min_ratio`` at ``total_steps`` (or constant 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

"""One training step's pieces, apart from the loop that runs them: the batch's move to the device, the whole
forward as one module for DeepSpeed, and what a step reports back."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from data_pipeline.loader.decode import ZERO_WHEN_ABSENT
from pretrain.model import MultimodalModel
from pretrain.objectives import DistContext, Forward


def batch_to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors onto ``device``; floating ones in ``dtype``, the engine's compute dtype (bf16 / fp16 weights take
    inputs of their own dtype; masks, ids and labels keep theirs).

    The cast runs on the device, after the copy: ``.to(cuda, bf16)`` in one call converts on the CPU first, in the
    training process's one thread (~26 ms for a batch of 128 images at 224 px). A modality no sample of the batch
    has is all zeros, so it is made on the device instead of copied (an image-text run carries a 64 MB empty audio
    batch).
    """
    absent = {key for key, flag in ZERO_WHEN_ABSENT.items() if flag in batch and not bool(batch[flag].any())}
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        target = dtype if value.is_floating_point() else value.dtype
        if key in absent:
            out[key] = torch.zeros(value.shape, dtype=target, device=device)
        else:  # the CPU batch (its leased memory) lives in run() until the next one, long after the step's sync
            out[key] = value.to(device, non_blocking=True).to(target)
    return out


def head_rows(batch: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The batch's first ``ceil(fraction * B)`` samples (at least one): every per-sample tensor and list cut to
    them; anything else (an evaluation's extra audio windows) as it is."""
    size = batch["has_text"].shape[0]
    rows = max(1, math.ceil(fraction * size))
    per_sample = lambda key, value: (not key.startswith("audio_more") and (
        isinstance(value, list) and len(value) == size or
        isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size))
    return {key: value[:rows] if per_sample(key, value) else value for key, value in batch.items()}


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass
class StepResult:
    """What one optimizer step (``engine.grad_accum`` micro-batches) did, agreed by every rank."""

    losses: dict[str, torch.Tensor]
    """Each loss term and the weighted total ``loss``, averaged over the micro-batches (this rank's share)."""
    samples: int = 0
    """Samples of every rank."""
    local_samples: int = 0
    nonfinite_loss_ranks: list[int] = dataclasses.field(default_factory=list)
    skipped: bool = False
    """No update: a non-finite loss or gradient on some rank."""
    stop: bool = False
    """A stop signal reached some rank: checkpoint and stop after this step."""
    checkpoint_due: bool = False
    """run.checkpoint_minutes have passed on rank 0's clock."""
    scale_overflow: bool = False
    """fp16: the loss scaler's overflow dropped the update (routine, not a failure)."""


class PretrainStep(nn.Module):
    """The whole training forward as one module, so DeepSpeed (ZeRO-3 included) sees a single ``forward``."""

    def __init__(self, model: MultimodalModel, objectives: list, ctx: DistContext, weights: dict[str, float],
                 trim_text: bool = False, masked_batch_fraction: float = 1.0):
        super().__init__()
        self.model, self.objectives, self.ctx, self.weights = model, objectives, ctx, weights
        self.trim_text, self.masked_batch_fraction = trim_text, masked_batch_fraction

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        whole = Forward(self.model, batch, self.trim_text)
        part = None  # the masked objectives' share of the batch, with its own cached encoder passes
        losses: dict[str, torch.Tensor] = {}
        for objective in self.objectives:
            forward = whole
            if getattr(objective, "sub_batch", False) and self.masked_batch_fraction < 1:
                part = part or Forward(self.model, head_rows(batch, self.masked_batch_fraction), self.trim_text, whole)
                forward = part
            for name, value in objective(self.model, forward.batch, forward, self.ctx).items():
                losses[name] = value
        return losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name.split("/")[0]] * value for name, value in losses.items())

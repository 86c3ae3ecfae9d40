"""One training step's pieces, apart from the loop that runs them: the batch's move to the device, the whole
forward as one module for DeepSpeed, and what a step reports back."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from data_pipeline.decode import ZERO_WHEN_ABSENT
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
                 trim_text: bool = False):
        super().__init__()
        self.model, self.objectives, self.ctx, self.weights = model, objectives, ctx, weights
        self.trim_text = trim_text

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        forward = Forward(self.model, batch, self.trim_text)
        losses: dict[str, torch.Tensor] = {}
        for objective in self.objectives:
            for name, value in objective(self.model, batch, forward, self.ctx).items():
                losses[name] = value
        return losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name.split("/")[0]] * value for name, value in losses.items())

"""The common interface of objectives and the shared forward pass.

An objective is a small callable ``(model, batch, forward, ctx) -> {loss name: scalar}``; the trainer weights and
sums them. ``Forward`` runs each encoder at most once per step and shares the result: with FLIP
(``contrastive.use_masked_forward``) the masked image pass that feeds MAE also feeds the contrastive loss.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pretrain.model import MultimodalModel
from pretrain.model.towers import Encoded, random_keep, trim_text_padding
from pretrain.objectives.gather import DistContext

class Objective(Protocol):
    name: str
    parts: set[str]  # the model parts (``pretrain.model.multimodal.PARTS``) its loss reads

    def __call__(self, model: MultimodalModel, batch: dict[str, Any], forward: "Forward", ctx: DistContext) -> dict[str, torch.Tensor]:
        ...


class Forward:
    """Lazily computed, cached encoder outputs for one batch.

    ``image(ratio)`` / ``audio(ratio)``: the tower run on the present samples with ``ratio`` of the patches
    dropped (0 = full). Rows are only those samples that have the modality; ``rows(modality)`` gives their batch
    indices.
    """

    def __init__(self, model: MultimodalModel, batch: dict[str, Any], trim_text: bool = False,
                 parent: "Forward | None" = None):
        self.model, self.batch, self.trim_text = model, batch, trim_text
        self._cache: dict[tuple, Encoded] = {}
        # This batch is the first rows of ``parent``'s: a full pass the parent ran already is sliced, not rerun.
        self.parent = parent

    def rows(self, modality: str) -> torch.Tensor:
        return self.batch[f"has_{modality}"].nonzero().squeeze(1)

    def image(self, mask_ratio: float = 0.0) -> Encoded:
        return self._patched("image", mask_ratio)

    def audio(self, mask_ratio: float = 0.0) -> Encoded:
        return self._patched("audio", mask_ratio)

    def _patched(self, modality: str, mask_ratio: float) -> Encoded:
        key = (modality, mask_ratio)
        if key not in self._cache and mask_ratio == 0 and self.parent is not None and key in self.parent._cache:
            whole, present = self.parent._cache[key], int(self.batch[f"has_{modality}"].sum())
            self._cache[key] = Encoded(pooled=whole.pooled[:present], tokens=whole.tokens[:present])
        if key not in self._cache:
            inputs = self.batch[modality][self.rows(modality)]
            encoder = self.model.encode_image if modality == "image" else self.model.encode_audio
            keep = None
            if mask_ratio > 0:
                patches = self.model.image_patches(inputs[:1]).shape[1] if modality == "image" else self.model.audio.patches
                keep = random_keep(inputs.shape[0], patches, 1.0 - mask_ratio, device=inputs.device)
            self._cache[key] = encoder(inputs, keep)
        return self._cache[key]

    def trimmed(self, text: torch.Tensor) -> torch.Tensor:
        """``text`` without its padding columns (``trim_text_padding``) when ``trim_text``: the causal pass never
        reads them, and the bidirectional passes mask them out."""
        return trim_text_padding(text) if self.trim_text else text

    def text(self) -> Encoded:
        """The causal text pass (CLIP's text tower) on the samples that have text; with ``trim_text``, without the
        padding columns after the last end-of-text token (``trim_text_padding``)."""
        if ("text",) not in self._cache:
            text = self.batch["text"][self.rows("text")]
            self._cache[("text",)] = self.model.encode_text(self.trimmed(text))
        return self._cache[("text",)]


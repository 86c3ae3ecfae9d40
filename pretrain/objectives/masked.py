"""Masked objectives: MAE for image pixels and log-mel patches, BERT-style masked text, and the cross-modal
masked objective (FLAVA's MMM: predict masked caption tokens through the fusion encoder from the other modalities).

Loss means are taken over the global count of predicted items (patches or tokens), like the contrastive loss,
so that DeepSpeed's gradient averaging gives the single-process gradient.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from pretrain.objectives.base import Forward
from pretrain.objectives.config import (CrossModalMaskedConfig, MaskedPatchConfig, MaskedTextConfig, ObjectivesConfig,
                                        fusion_context_ratios)
from pretrain.objectives.gather import DistContext

START_OF_TEXT, END_OF_TEXT = 49406, 49407


def _global_mean(total: torch.Tensor, count: int, ctx: DistContext, device) -> torch.Tensor:
    count_all = ctx.all_sum(torch.tensor(float(count), device=device))
    return ctx.world_size * total / count_all.clamp_min(1.0)


class _MaskedPatches:
    modality = ""
    sub_batch = True  # reads objectives.masked_batch_fraction of the batch

    def __init__(self, cfg: MaskedPatchConfig, objectives: ObjectivesConfig):
        self.cfg = cfg
        self.parts = {self.modality, f"{self.modality}_decoder"}

    def __call__(self, model, batch, forward: Forward, ctx: DistContext) -> dict[str, torch.Tensor]:
        rows = forward.rows(self.modality)
        encoded = forward.image(self.cfg.mask_ratio) if self.modality == "image" else forward.audio(self.cfg.mask_ratio)
        inputs = batch[self.modality][rows].float()  # targets and loss in fp32 whatever the weights'
        if self.modality == "image":
            target, decoder = model.image_patches(inputs), model.image_decoder
        else:
            target, decoder = model.audio_patches(inputs), model.audio_decoder
        prediction = decoder(encoded.tokens, encoded.keep)
        return {f"masked_{self.modality}": _patch_loss(prediction, target, encoded.keep, self.cfg.norm_targets, ctx)}


def _patch_loss(prediction: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, norm_targets: bool,
                ctx: DistContext) -> torch.Tensor:
    """MAE's loss: mean squared error over the dropped patches (those not in ``keep``), against per-patch
    normalised targets (norm_pix_loss) when ``norm_targets``."""
    if norm_targets and target.numel():
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    masked = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
    masked.scatter_(1, keep, False)
    error = ((prediction.float() - target) ** 2).mean(-1)  # per patch
    total = (error * masked).sum()
    return _global_mean(total, int(masked.sum()), ctx, total.device)


class MaskedImage(_MaskedPatches):
    modality = "image"


class MaskedAudio(_MaskedPatches):
    modality = "audio"


def mask_tokens(text: torch.Tensor, prob: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT masking of caption tokens (not start/end/padding). Returns (inputs, selected mask, replace-with-mask-embedding mask)."""
    maskable = (text != 0) & (text != START_OF_TEXT) & (text != END_OF_TEXT)
    selected = (torch.rand(text.shape, device=text.device) < prob) & maskable
    # Guarantee one prediction per caption that has any maskable token, so no caption contributes nothing.
    none = ~selected.any(dim=1) & maskable.any(dim=1)
    if none.any():
        first = maskable.float().argmax(dim=1)
        selected[none.nonzero().squeeze(1), first[none]] = True
    roll = torch.rand(text.shape, device=text.device)
    use_mask = selected & (roll < 0.8)
    use_random = selected & (roll >= 0.8) & (roll < 0.9)
    inputs = torch.where(use_random, torch.randint_like(text, 1, START_OF_TEXT), text)
    return inputs, selected, use_mask


def masked_captions(forward: Forward, text: torch.Tensor, prob: float) -> tuple[torch.Tensor, ...]:
    """(text, inputs, selected, use_mask) of ``mask_tokens``, without the padding columns when the forward trims
    them: the draws are made over the whole context, so they are the same trimmed or not."""
    masks = (text, *mask_tokens(text, prob))
    width = forward.trimmed(text).shape[1]
    return tuple(m[:, :width] for m in masks)


def _token_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                selected: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Cross-entropy at the selected positions only: the vocabulary head (49408 wide) runs on those alone."""
    logits = head(hidden[selected]).float()
    # "+ 0 * hidden.sum()" keeps the graph connected on a rank with nothing to predict this step.
    total = F.cross_entropy(logits, targets[selected], reduction="sum") + 0.0 * (hidden.sum() + logits.sum())
    return _global_mean(total, int(selected.sum()), ctx, hidden.device)


class MaskedText:
    sub_batch = True

    def __init__(self, cfg: MaskedTextConfig, objectives: ObjectivesConfig):
        self.cfg = cfg
        self.parts = {"text", "text_mask_embedding", "text_mlm_head"}

    def __call__(self, model, batch, forward: Forward, ctx: DistContext) -> dict[str, torch.Tensor]:
        text, inputs, selected, use_mask = masked_captions(forward, batch["text"][forward.rows("text")], self.cfg.mask_prob)
        encoded = model.encode_text(inputs, causal=False, masked=use_mask)
        return {"masked_text": _token_loss(partial(model.word_logits, "text_mlm_head"), encoded.tokens, text, selected, ctx)}


class CrossModalMasked:
    """Masked caption tokens predicted by the fusion encoder from the caption context plus the image and audio
    tokens of the same sample; with ``patches``, masked image patches too, from the caption and the audio."""

    sub_batch = True

    def __init__(self, cfg: CrossModalMaskedConfig, objectives: ObjectivesConfig):
        self.cfg, self.norm_targets = cfg, objectives.masked_image.norm_targets
        self.parts = {"text", "text_mask_embedding", "fusion", "mlm_head", "image", "audio"}
        self.ratio = fusion_context_ratios(objectives)
        if cfg.patches:  # the image is masked for both predictions, as in FLAVA
            self.parts.add("fused_patch_decoder")
            self.ratio["image"] = objectives.masked_image.mask_ratio

    def __call__(self, model, batch, forward: Forward, ctx: DistContext) -> dict[str, torch.Tensor]:
        has_text = batch["has_text"]
        # Samples with text and at least one other modality.
        usable = has_text & (batch["has_image"] | batch["has_audio"])
        text, inputs, selected, use_mask = masked_captions(forward, batch["text"][usable], self.cfg.mask_prob)
        encoded = model.encode_text(inputs, causal=False, masked=use_mask)
        contexts, padding, towers = {}, {}, {}
        for modality in ("image", "audio"):
            present = batch[f"has_{modality}"]
            tower = forward.image(self.ratio["image"]) if modality == "image" else forward.audio(self.ratio["audio"])
            # Scatter the present samples' tokens into batch rows; absent samples are padding.
            tokens = tower.tokens.new_zeros(present.shape[0], tower.tokens.shape[1], tower.tokens.shape[2])
            tokens[present] = tower.tokens
            contexts[modality] = tokens[usable]
            padding[modality] = (~present[usable]).unsqueeze(1).expand(-1, tokens.shape[1])
            towers[modality] = tower
        fused = model.fusion(encoded.tokens, contexts, text_padding=text == 0, context_padding=padding)
        losses = {"cross_modal_masked": _token_loss(partial(model.word_logits, "mlm_head"), fused, text, selected, ctx)}
        if self.cfg.patches:
            losses["cross_modal_masked/image"] = self.patch_loss(model, batch, usable, encoded.tokens, text, contexts,
                                                                 padding, towers["image"], ctx)
        return losses

    def patch_loss(self, model, batch, usable, text_tokens, text, contexts, padding, image, ctx) -> torch.Tensor:
        """The dropped patches of the samples with an image, predicted from the visible ones, the (masked) caption
        and the audio."""
        if model.fused_patch_decoder is None:
            raise ValueError("objectives.cross_modal_masked.patches needs a model built with model.fused_patch_decoder=true")
        with_image = batch["has_image"][usable]  # of the usable rows
        mine = usable[batch["has_image"]]  # of the rows the image pass encoded
        prediction = model.fused_patch_decoder(model.fusion, image.tokens[mine], image.keep[mine],
                                               text_tokens[with_image], (text == 0)[with_image],
                                               contexts["audio"][with_image], padding["audio"][with_image])
        target = model.image_patches(batch["image"][usable & batch["has_image"]].float())
        # With no sample to predict, the empty prediction still connects the decoder to the (zero) loss.
        return _patch_loss(prediction, target, image.keep[mine], self.norm_targets, ctx)

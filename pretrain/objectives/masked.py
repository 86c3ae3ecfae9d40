"""Masked objectives: MAE for image pixels and log-mel patches, BERT-style masked text, and the cross-modal
masked objective (FLAVA's MMM: predict masked caption tokens through the fusion encoder from the other modalities).

Loss means are taken over the global count of predicted items (patches or tokens), like the contrastive loss,
so that DeepSpeed's gradient averaging gives the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.objectives.base import Forward, register
from pretrain.objectives.config import MaskedPatchConfig, MaskedTextConfig, ObjectivesConfig
from pretrain.objectives.gather import DistContext

START_OF_TEXT, END_OF_TEXT = 49406, 49407


def _global_mean(total: torch.Tensor, count: int, ctx: DistContext, device) -> torch.Tensor:
    count_all = ctx.all_sum(torch.tensor(float(count), device=device))
    return ctx.world_size * total / count_all.clamp_min(1.0)


class _MaskedPatches:
    modality = ""

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
        if self.cfg.norm_targets:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        prediction = decoder(encoded.tokens, encoded.keep)
        masked = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
        masked.scatter_(1, encoded.keep, False)
        error = ((prediction.float() - target) ** 2).mean(-1)  # per patch
        total = (error * masked).sum()
        return {f"masked_{self.modality}": _global_mean(total, int(masked.sum()), ctx, total.device)}


@register("masked_image")
class MaskedImage(_MaskedPatches):
    modality = "image"


@register("masked_audio")
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


def _token_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
                ctx: DistContext) -> torch.Tensor:
    """Cross-entropy at the selected positions only: the vocabulary head (49408 wide) runs on those alone."""
    logits = head(hidden[selected]).float()
    # "+ 0 * hidden.sum()" keeps the graph connected on a rank with nothing to predict this step.
    total = F.cross_entropy(logits, targets[selected], reduction="sum") + 0.0 * (hidden.sum() + logits.sum())
    return _global_mean(total, int(selected.sum()), ctx, hidden.device)


@register("masked_text")
class MaskedText:
    def __init__(self, cfg: MaskedTextConfig, objectives: ObjectivesConfig):
        self.cfg = cfg
        self.parts = {"text", "text_mask_embedding", "text_mlm_head"}

    def __call__(self, model, batch, forward: Forward, ctx: DistContext) -> dict[str, torch.Tensor]:
        text = batch["text"][forward.rows("text")]
        inputs, selected, use_mask = mask_tokens(text, self.cfg.mask_prob)
        encoded = model.encode_text(inputs, causal=False, masked=use_mask)
        return {"masked_text": _token_loss(model.text_mlm_head, encoded.tokens, text, selected, ctx)}


@register("cross_modal_masked")
class CrossModalMasked:
    """Masked caption tokens predicted by the fusion encoder from the (unmasked) caption context plus the image
    and audio tokens of the same sample."""

    def __init__(self, cfg: MaskedTextConfig, objectives: ObjectivesConfig):
        self.cfg = cfg
        self.parts = {"text", "text_mask_embedding", "fusion", "mlm_head", "image", "audio"}
        self.ratio = {"image": objectives.masked_image.mask_ratio if objectives.masked_image.weight > 0 else 0.0,
                      "audio": objectives.masked_audio.mask_ratio if objectives.masked_audio.weight > 0 else 0.0}

    def __call__(self, model, batch, forward: Forward, ctx: DistContext) -> dict[str, torch.Tensor]:
        has_text = batch["has_text"]
        # Samples with text and at least one other modality.
        usable = has_text & (batch["has_image"] | batch["has_audio"])
        text = batch["text"][usable]
        inputs, selected, use_mask = mask_tokens(text, self.cfg.mask_prob)
        encoded = model.encode_text(inputs, causal=False, masked=use_mask)
        contexts, padding = {}, {}
        for modality in ("image", "audio"):
            present = batch[f"has_{modality}"]
            tower = forward.image(self.ratio["image"]) if modality == "image" else forward.audio(self.ratio["audio"])
            # Scatter the present samples' tokens into batch rows; absent samples are padding.
            tokens = tower.tokens.new_zeros(present.shape[0], tower.tokens.shape[1], tower.tokens.shape[2])
            tokens[present] = tower.tokens
            contexts[modality] = tokens[usable]
            padding[modality] = (~present[usable]).unsqueeze(1).expand(-1, tokens.shape[1])
        fused = model.fusion(encoded.tokens, contexts, text_padding=text == 0, context_padding=padding)
        return {"cross_modal_masked": _token_loss(model.mlm_head, fused, text, selected, ctx)}

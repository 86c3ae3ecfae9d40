"""Encoders with token dropping (MAE / FLIP): each returns pooled features, token features and what it kept.

The image and text towers are an ``open_clip.CLIP`` (so open_clip's released weights load into it unchanged);
the forward passes here reuse its modules and reduce exactly to ``CLIP.encode_image`` / ``CLIP.encode_text``
when nothing is dropped (tested). The audio tower is timm's VisionTransformer over log-mel patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import timm
import torch
from timm.models._manipulate import checkpoint_seq
from torch import nn

from pretrain.model.config import AudioTowerConfig, ModelConfig, conv_stem_channels


@dataclass
class Encoded:
    """One modality's encoder output.

    pooled: ``[B, width]`` before projection; tokens: ``[B, 1 + K, width]`` (class token first, then the K kept
    patches or all text positions); keep: ``[B, K]`` indices of the kept patches (None when nothing was dropped).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    keep: torch.Tensor | None = None


def random_keep(batch: int, patches: int, keep_ratio: float, generator: torch.Generator | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """Indices of the patches to keep, sorted, ``[B, round(patches * keep_ratio)]`` (MAE's random masking)."""
    keep = max(1, round(patches * keep_ratio))
    noise = torch.rand(batch, patches, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def _gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep the class token and the patches at ``keep`` (x: [B, 1 + N, D])."""
    index = (keep + 1).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.cat([x[:, :1], x.gather(1, index)], dim=1)


def open_clip_config(cfg: ModelConfig) -> dict:
    """The open_clip model config of the image-text part (what ``open_clip_config.json`` holds)."""
    config = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.image.image_size, "patch_size": cfg.image.patch_size, "width": cfg.image.width,
                       "layers": cfg.image.layers, "head_width": cfg.image.width // cfg.image.heads,
                       "mlp_ratio": cfg.image.mlp_ratio, "pool_type": cfg.image.pool_type},
        "text_cfg": {"context_length": cfg.text.context_length, "vocab_size": cfg.text.vocab_size,
                     "width": cfg.text.width, "heads": cfg.text.heads, "layers": cfg.text.layers,
                     "mlp_ratio": cfg.text.mlp_ratio},
    }
    if cfg.quick_gelu:
        config["quick_gelu"] = True
    if cfg.contrastive == "siglip":
        config["init_logit_bias"] = cfg.init_logit_bias
    return config


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions (GroupNorm, GELU) from pixels to the ``patch_size``-strided token grid, then a 1x1
    projection to ``width``: a drop-in for the ViT's patch convolution (``[B, 3, H, W] -> [B, width, H/p, W/p]``).
    Channels: ``conv_stem_channels``."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        channels = conv_stem_channels(width, patch_size)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.GELU()]
        layers.append(nn.Conv2d(channels[-1], width, 1))
        self.layers = nn.Sequential(*layers)
        self.patch_size = patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def build_clip(cfg: ModelConfig) -> open_clip.CLIP:
    clip = open_clip.CLIP(**open_clip_config(cfg), init_logit_scale=cfg.init_logit_scale)
    if cfg.image.stem == "conv":  # open_clip's own forward calls visual.conv1 too, so it runs this stem unchanged
        clip.visual.conv1 = ConvStem(cfg.image.width, cfg.image.patch_size)
    # DeepSpeed cannot partition or broadcast 0-dim parameters: hold temperatures as shape [1] (the open_clip
    # export squeezes them back).
    clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
    if clip.logit_bias is not None:
        clip.logit_bias = nn.Parameter(clip.logit_bias.detach().reshape(1))
    return clip


def _zero_dropped_patches(images: torch.Tensor, keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The images with the pixels of every patch not in ``keep`` set to 0 (the normalised mean)."""
    b, _, h, w = images.shape
    grid = torch.zeros(b, (h // patch_size) * (w // patch_size), device=images.device, dtype=images.dtype)
    grid.scatter_(1, keep, 1.0)
    grid = grid.view(b, 1, h // patch_size, w // patch_size)
    return images * grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def encode_image(clip: open_clip.CLIP, images: torch.Tensor, keep: torch.Tensor | None = None) -> Encoded:
    visual = clip.visual
    if keep is not None and isinstance(visual.conv1, ConvStem):
        # A convolution stack's receptive field crosses patch borders: blank the dropped patches first, so the kept
        # tokens (and MAE's reconstruction of the dropped ones) never see the pixels they are meant not to see.
        images = _zero_dropped_patches(images, keep, visual.conv1.patch_size)
    x = visual.conv1(images)  # [B, width, gh, gw]
    x = x.flatten(2).transpose(1, 2)  # [B, N, width]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    if keep is not None:
        x = _gather_tokens(x, keep)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    x = visual.ln_post(x)
    pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]  # open_clip's _global_pool
    return Encoded(pooled=pooled, tokens=x, keep=keep)


def project_image(clip: open_clip.CLIP, pooled: torch.Tensor) -> torch.Tensor:
    return pooled @ clip.visual.proj


def encode_text(clip: open_clip.CLIP, text: torch.Tensor, causal: bool = True, masked: torch.Tensor | None = None,
                mask_embedding: torch.Tensor | None = None) -> Encoded:
    """``causal=False`` is the bidirectional pass of masked-token prediction, in which every position attends to
    the caption's tokens and none to the padding after them (BERT's attention mask); positions where ``masked`` is
    True get ``mask_embedding`` instead of their token's (CLIP's vocabulary has no mask token)."""
    n = text.shape[1]  # the context length, or fewer positions (trim_text_padding)
    x = clip.token_embedding(text)
    if masked is not None:
        x = torch.where(masked.unsqueeze(-1), mask_embedding.to(x.dtype), x)
    x = x + clip.positional_embedding[:n]
    if causal or not len(text):  # (torch's attention cannot shape a per-sample mask for an empty batch)
        attn_mask = clip.attn_mask[:n, :n] if causal and clip.attn_mask is not None else None
    else:  # per sample, so [batch x heads, n, n] (open_clip's blocks take no key-padding mask)
        heads = clip.transformer.resblocks[0].attn.num_heads
        padding = torch.zeros(text.shape, dtype=x.dtype, device=x.device).masked_fill(text == 0, float("-inf"))
        attn_mask = padding.unsqueeze(1).expand(-1, n, -1).repeat_interleave(heads, dim=0)
    x = clip.transformer(x, attn_mask=attn_mask)
    x = clip.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # the end-of-text token
    return Encoded(pooled=pooled, tokens=x)


def trim_text_padding(text: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Token ids without the padding columns after the batch's last end-of-text token (rounded up to
    ``multiple`` columns, at most the context length).

    In the causal pass a position sees only those before it, and the pooled feature is the end-of-text token's,
    so these columns change nothing that pooling reads: web captions are mostly far shorter than the context, and
    the text tower's cost falls with the columns dropped. The pooled features equal the untrimmed pass's up to
    float rounding (tested); the token features are those of the kept positions.
    """
    if text.shape[0] == 0:
        return text
    end = int(text.argmax(dim=-1).max()) + 1  # the end-of-text token has the largest id (open_clip's tokenizer)
    return text[:, :min(text.shape[1], -(-end // multiple) * multiple)]


def project_text(clip: open_clip.CLIP, pooled: torch.Tensor) -> torch.Tensor:
    return pooled @ clip.text_projection


class AudioTower(nn.Module):
    """timm's VisionTransformer on ``[B, 1, n_mels, frames]`` log-mel input, with MAE-style patch dropping."""

    def __init__(self, cfg: AudioTowerConfig, embed_dim: int):
        super().__init__()
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=(cfg.n_mels, cfg.frames), patch_size=cfg.patch_size, in_chans=1, num_classes=0,
            embed_dim=cfg.width, depth=cfg.layers, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
            global_pool="token", class_token=True)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        # Log-mel values are roughly in [-23, 5]; a fixed affine keeps the patch embedding's input near unit scale.
        self.register_buffer("mean", torch.tensor(-8.0), persistent=False)
        self.register_buffer("std", torch.tensor(5.0), persistent=False)

    @property
    def patches(self) -> int:
        return self.vit.patch_embed.num_patches

    def forward(self, mel: torch.Tensor, keep: torch.Tensor | None = None) -> Encoded:
        x = ((mel - self.mean) / self.std).unsqueeze(1)  # [B, 1, n_mels, frames]
        x = self.vit.patch_embed(x)
        x = self.vit._pos_embed(x)  # prepends the class token and adds positions
        if keep is not None:
            x = _gather_tokens(x, keep)
        x = self.vit.norm_pre(x)
        # timm's forward_features checkpoints the same way; this forward bypasses it, so honour the flag here.
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.vit.blocks, x, use_reentrant=False)
        else:
            x = self.vit.blocks(x)
        x = self.vit.norm(x)
        return Encoded(pooled=x[:, 0], tokens=x, keep=keep)

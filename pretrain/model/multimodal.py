"""The multimodal model: image, text and audio towers projecting into one space, a fusion encoder, MAE decoders.

Plain single-device PyTorch: parallelism is applied from outside (the engine), and the only collective in the
math lives in ``pretrain/objectives/gather.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.heads import FusedPatchDecoder, FusionEncoder, PatchDecoder, WordHead
from pretrain.model.towers import AudioTower, Encoded, build_clip, encode_image, encode_text, project_image, project_text

TOWERS = ("image", "text", "audio")
# What objectives train: each declares the parts it reads, and parts no enabled objective reads stay frozen.
PARTS = TOWERS + ("temperature", "image_decoder", "audio_decoder", "text_mask_embedding", "text_mlm_head", "fusion",
                  "mlm_head", "fused_patch_decoder")


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.clip = build_clip(cfg)  # image + text towers, logit_scale (and logit_bias for SigLIP)
        self.audio = AudioTower(cfg.audio, cfg.embed_dim)
        self.fusion = FusionEncoder(cfg.fusion, cfg.text.width, {"image": cfg.image.width, "audio": cfg.audio.width})
        image_patches = (cfg.image.image_size // cfg.image.patch_size) ** 2
        self.image_decoder = PatchDecoder(cfg.decoder, cfg.image.width, image_patches, 3 * cfg.image.patch_size**2)
        self.audio_decoder = PatchDecoder(cfg.decoder, cfg.audio.width, self.audio.patches, cfg.audio.patch_size**2)
        tied = cfg.tie_word_embeddings
        self.mlm_head = WordHead(cfg.fusion.width, cfg.text.width, cfg.text.vocab_size, tied)
        self.fused_patch_decoder = FusedPatchDecoder(
            cfg.fusion.width, cfg.image.width, {"text": cfg.text.width, "audio": cfg.audio.width}, image_patches,
            3 * cfg.image.patch_size**2) if cfg.fused_patch_decoder else None
        self.text_mlm_head = WordHead(cfg.text.width, cfg.text.width, cfg.text.vocab_size, tied)
        self.text_mask_embedding = nn.Parameter(torch.zeros(cfg.text.width))

    # Encoders: ``keep`` drops patches (MAE/FLIP); ``None`` runs the full sequence.
    def encode_image(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> Encoded:
        return encode_image(self.clip, images, keep)

    def encode_text(self, text: torch.Tensor, causal: bool = True, masked: torch.Tensor | None = None) -> Encoded:
        return encode_text(self.clip, text, causal, masked, self.text_mask_embedding)

    def encode_audio(self, mel: torch.Tensor, keep: torch.Tensor | None = None) -> Encoded:
        return self.audio(mel, keep)

    def word_logits(self, head: str, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of ``hidden`` from a masked-word head (``text_mlm_head`` or ``mlm_head``)."""
        return getattr(self, head)(hidden, self.clip.token_embedding.weight)

    def project(self, modality: str, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled tower features → the shared space, L2-normalised."""
        if modality == "image":
            features = project_image(self.clip, pooled)
        elif modality == "text":
            features = project_text(self.clip, pooled)
        else:
            features = self.audio.proj(pooled)
        return F.normalize(features, dim=-1)

    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings of full (unmasked) inputs: what evaluation and fine-tuning use."""
        encoders = {"image": self.encode_image, "text": self.encode_text, "audio": self.encode_audio}
        return self.project(modality, encoders[modality](inputs).pooled)

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        """The parameters of one encoder tower (for locking and per-tower settings)."""
        if tower == "image":
            return list(self.clip.visual.parameters())
        if tower == "audio":
            return list(self.audio.parameters())
        visual = {id(p) for p in self.clip.visual.parameters()}
        return [p for name, p in self.clip.named_parameters() if id(p) not in visual and not name.startswith("logit_")]

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters of one named part (``PARTS``): a tower, the temperature, or a head."""
        if part in TOWERS:
            return self.tower_parameters(part)
        if part == "temperature":
            return [p for name, p in self.clip.named_parameters() if name.startswith("logit_")]
        if part == "text_mask_embedding":
            return [self.text_mask_embedding]
        if part not in PARTS:
            raise ValueError(f"unknown model part {part!r}; parts: {', '.join(PARTS)}")
        module = getattr(self, part)
        return list(module.parameters()) if module is not None else []  # an optional head not built

    def tower_blocks(self, tower: str) -> list[nn.Module]:
        """The transformer blocks of one tower (where its compute and activation memory are)."""
        if tower == "image":
            return list(self.clip.visual.transformer.resblocks)
        if tower == "text":
            return list(self.clip.transformer.resblocks)
        return list(self.audio.vit.blocks)

    def set_grad_checkpointing(self, towers: list[str]) -> None:
        """Recompute the block activations of ``towers`` in backward (open_clip's and timm's own switches)."""
        self.clip.visual.set_grad_checkpointing("image" in towers)
        self.clip.transformer.grad_checkpointing = "text" in towers
        self.audio.vit.set_grad_checkpointing("audio" in towers)

    def compile_towers(self, towers: list[str], mode: str = "default") -> None:
        """``torch.compile`` each transformer block of ``towers`` in place (parameter names unchanged). Regional
        compilation: the blocks of a tower share one forward, so one graph is compiled and reused by every layer,
        and gradient checkpointing (which calls the blocks) still applies."""
        for tower in towers:
            for block in self.tower_blocks(tower):
                block.compile(mode=mode)

    def loose_parameters(self) -> list[nn.Parameter]:
        """Parameters used outside their own module's ``forward`` (class and position embeddings, projections,
        temperatures): a partitioning engine (ZeRO-3) must gather them for the whole step."""
        owners = [self, self.clip, self.clip.visual, self.audio, self.audio.vit]
        tied = [self.clip.token_embedding.weight] if self.cfg.tie_word_embeddings else []  # read by the word heads
        return [p for owner in owners for p in owner.parameters(recurse=False)] + tied

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return self.clip.logit_bias

    def image_patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` → ``[B, N, 3 * p * p]`` pixel patches in the encoder's patch order (MAE targets)."""
        p = self.cfg.image.patch_size
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def audio_patches(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, n_mels, frames]`` → ``[B, N, p * p]`` log-mel patches in the audio tower's patch order."""
        p = self.cfg.audio.patch_size
        b, m, t = mel.shape
        x = mel.reshape(b, m // p, p, t // p, p)
        return x.permute(0, 1, 3, 2, 4).reshape(b, (m // p) * (t // p), p * p)

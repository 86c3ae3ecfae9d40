"""Small modules on top of the towers: the fusion encoder, the masked-word heads and the MAE patch decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import DecoderConfig, FusionConfig


class WordHead(nn.Module):
    """Hidden states → vocabulary logits for the masked-word objectives. Tied (the default): the logits are dot
    products with the text tower's token embedding (passed in by the caller, so the head never owns it), through a
    projection when the hidden width is not the text width, plus a bias. The embedding is read, not trained,
    through the head: trained through it, Adam moved all 49k rows every step (the softmax's small push on words
    that never occur, normalised to a full step), the mean row norm grew 0.16 -> 0.70 in the demo's pre-training
    and its VQA fine-tune fell 5 points. Untied: a linear layer of its own (``weight`` and ``bias``, as releases
    before ``model.tie_word_embeddings`` stored them)."""

    def __init__(self, width: int, text_width: int, vocab_size: int, tied: bool):
        super().__init__()
        if tied:
            self.proj = nn.Linear(width, text_width) if width != text_width else None
            self.weight = None
            self.bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            own = nn.Linear(width, vocab_size)
            self.proj, self.weight, self.bias = None, own.weight, own.bias

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(hidden, self.weight, self.bias)
        if self.proj is not None:
            hidden = self.proj(hidden)
        return F.linear(hidden, token_embedding.detach(), self.bias)


class FusionEncoder(nn.Module):
    """Text tokens attend to each other (bidirectionally) and, through cross-attention, to the tokens of the
    other modalities. Serves the cross-modal masked objective and fine-tuning's VQA / classification heads."""

    def __init__(self, cfg: FusionConfig, text_width: int, context_widths: dict[str, int]):
        super().__init__()
        self.query_in = nn.Linear(text_width, cfg.width)
        # One projection per context modality into the fusion width, plus a learned modality embedding.
        self.context_in = nn.ModuleDict({name: nn.Linear(width, cfg.width) for name, width in context_widths.items()})
        self.modality = nn.ParameterDict({name: nn.Parameter(torch.zeros(cfg.width)) for name in context_widths})
        layer = nn.TransformerDecoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, cfg.layers, norm=nn.LayerNorm(cfg.width))
        self.width = cfg.width

    def forward(self, text_tokens: torch.Tensor, contexts: dict[str, torch.Tensor],
                text_padding: torch.Tensor | None = None, context_padding: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """text_tokens ``[B, T, text_width]``; contexts: modality → ``[B, L_m, width_m]``; paddings are True where a
        position must be ignored. Returns ``[B, T, fusion width]``."""
        memory = [self.context_in[name](tokens) + self.modality[name] for name, tokens in contexts.items()]
        padding = [(context_padding or {}).get(name) for name in contexts]
        return self.attend(self.query_in(text_tokens), memory, padding, text_padding)

    def attend(self, query: torch.Tensor, memory: list[torch.Tensor], padding: list[torch.Tensor | None],
               query_padding: torch.Tensor | None = None) -> torch.Tensor:
        """The fusion layers: ``query`` ``[B, Q, width]`` attends to itself and to the ``memory`` tokens (each
        ``[B, L, width]``, already in the fusion width; its padding True where ignored, or None)."""
        memory_padding = torch.cat([pad if pad is not None else torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
                                    for tokens, pad in zip(memory, padding)], dim=1)
        # A sample with no context at all would softmax over nothing (NaN): let it attend to one (zero-weight-
        # in-the-loss) slot instead.
        empty = memory_padding.all(dim=1)
        if empty.any():
            memory_padding = memory_padding.clone()
            memory_padding[empty, 0] = False
        if not len(query):  # a rank whose batch has nothing to fuse: torch's attention cannot shape empty masks
            query_padding = memory_padding = None
        return self.layers(query, torch.cat(memory, dim=1), tgt_key_padding_mask=query_padding,
                           memory_key_padding_mask=memory_padding)


class FusedPatchDecoder(nn.Module):
    """Masked image patches predicted through the fusion encoder (FLAVA's masked multimodal modelling on the image
    side): the full patch grid (the visible patches' tokens, a mask token at each dropped one, positions) queries
    the caption's tokens and the audio's, and a linear head reconstructs each patch's pixels."""

    def __init__(self, fusion_width: int, image_width: int, context_widths: dict[str, int], patches: int, patch_dim: int):
        super().__init__()
        self.embed = nn.Linear(image_width, fusion_width)
        self.mask_token = nn.Parameter(torch.zeros(fusion_width))
        self.position = nn.Parameter(torch.randn(1, patches, fusion_width) * 0.02)
        # Its own context projections (text, audio): only the fusion layers are shared, and they are called as a
        # module, where ZeRO-3 gathers their parameters.
        self.context_in = nn.ModuleDict({name: nn.Linear(width, fusion_width) for name, width in context_widths.items()})
        self.modality = nn.ParameterDict({name: nn.Parameter(torch.zeros(fusion_width)) for name in context_widths})
        self.head = nn.Linear(fusion_width, patch_dim)
        self.patches = patches

    def forward(self, fusion: FusionEncoder, tokens: torch.Tensor, keep: torch.Tensor, text: torch.Tensor,
                text_padding: torch.Tensor, audio: torch.Tensor, audio_padding: torch.Tensor) -> torch.Tensor:
        """tokens ``[B, 1 + K, image_width]`` (class token first) of the kept patches ``keep`` ``[B, K]``; text and
        audio tokens with their paddings → predictions ``[B, N, patch_dim]``."""
        x = self.embed(tokens[:, 1:])
        grid = self.mask_token.to(x.dtype).expand(x.shape[0], self.patches, -1).clone()
        grid.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        memory = [self.context_in["text"](text) + self.modality["text"], self.context_in["audio"](audio) + self.modality["audio"]]
        return self.head(fusion.attend(grid + self.position, memory, [text_padding, audio_padding]))


class PatchDecoder(nn.Module):
    """MAE's light decoder: visible tokens plus mask tokens at the dropped positions → per-patch predictions."""

    def __init__(self, cfg: DecoderConfig, encoder_width: int, patches: int, patch_dim: int):
        super().__init__()
        self.embed = nn.Linear(encoder_width, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))
        self.position = nn.Parameter(torch.randn(1, patches + 1, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, norm=nn.LayerNorm(cfg.width), enable_nested_tensor=False)
        self.head = nn.Linear(cfg.width, patch_dim)
        self.patches = patches

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """tokens ``[B, 1 + K, width]`` (class token first), keep ``[B, K]`` → predictions ``[B, N, patch_dim]``."""
        x = self.embed(tokens)
        batch = x.shape[0]
        full = self.mask_token.to(x.dtype).expand(batch, self.patches, -1).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.position
        return self.head(self.blocks(x)[:, 1:])

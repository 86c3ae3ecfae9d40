"""Image captioning, CoCa-style: open_clip's multimodal decoder (causal self-attention over the text tower's
token features, cross-attention to the image tokens) predicts the next token; trained with teacher forcing on
one reference caption per sample (drawn anew each time), decoded by beam search or nucleus sampling, scored with
pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE needs a download and is left out) against every
reference, predictions written in the COCO results format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer
from torch import nn

from finetune.tasks.base import Task, TaskContext


class CaptionDecoder(nn.Module):
    """Image tokens (projected to the text width) + the text tower's causal token features → hidden states, and
    ``logits`` of the positions that need them: projecting every position onto a 49k vocabulary would cost more
    than the whole decoder (at generation time only the last position is needed)."""

    def __init__(self, image_width: int, text_width: int, heads: int, layers: int, context_length: int, vocab_size: int):
        super().__init__()
        self.image_in = nn.Linear(image_width, text_width)
        self.decoder = MultimodalTransformer(width=text_width, layers=layers, heads=heads, context_length=context_length,
                                             output_dim=vocab_size)
        self.decoder.text_projection = None  # applied by ``logits`` to the selected positions only
        self.to_vocab = nn.Parameter(torch.randn(text_width, vocab_size) * text_width ** -0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.image_in(image_tokens), text_tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.to_vocab


class Captioner(Task):
    """Shared by captioning and generative VQA: a decoder over the backbone, teacher forcing and generation."""

    def __init__(self, cfg, backbone, context: TaskContext):
        super().__init__(cfg, backbone, context)
        mc = backbone.cfg
        self.context_length = mc.text.context_length
        self.decoder = CaptionDecoder(mc.image.width, mc.text.width, mc.text.heads, cfg.caption.layers,
                                      self.context_length, mc.text.vocab_size)
        self.sot, self.eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id

    def backbone_parts(self) -> list[str]:
        return ["image", "text"]

    def teacher_forcing_loss(self, images: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over non-padding targets (``weight`` [B, T-1] selects which count)."""
        image_tokens = self.backbone.encode_image(images).tokens
        text_tokens = self.backbone.encode_text(tokens, causal=True).tokens
        hidden = self.decoder(image_tokens, text_tokens)[:, :-1]
        targets = tokens[:, 1:]
        mask = (targets != 0) if weight is None else weight
        return F.cross_entropy(self.decoder.logits(hidden[mask]), targets[mask])

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prefixes: list[list[int]] | None = None, max_len: int | None = None) -> list[list[int]]:
        """Token ids of one generated text per image (without start/end tokens). ``prefixes`` (token ids after the
        start token, one list per image) are forced before generation starts (generative VQA: the question)."""
        from finetune.decoding import beam_search, sample

        cc = self.cfg.caption
        image_tokens = self.backbone.encode_image(images).tokens
        prefixes = prefixes or [[] for _ in range(images.shape[0])]
        longest = max(len(p) for p in prefixes)
        max_len = min(max_len or cc.max_len, self.context_length - 2 - longest)

        def step(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # Each partial sequence is start + its prefix + what was generated; padding after it does not change the
            # causal features at its last position.
            n, t = tokens.shape
            full = torch.zeros(n, self.context_length, dtype=torch.long)
            last = torch.empty(n, dtype=torch.long)
            for i, row in enumerate(rows.tolist()):
                seq = [self.sot, *prefixes[row], *tokens[i, 1:].tolist()]
                full[i, :len(seq)] = torch.tensor(seq)
                last[i] = len(seq) - 1
            text_tokens = self.backbone.encode_text(full.to(images.device), causal=True).tokens
            hidden = self.decoder(image_tokens[rows.to(images.device)], text_tokens)
            logits = self.decoder.logits(hidden[torch.arange(n, device=images.device), last.to(images.device)])
            # The search runs on the CPU (and its generator with it), whatever device the model is on.
            return logits.float().cpu()

        if cc.sampling:
            return sample(step, images.shape[0], self.sot, self.eot, max_len, top_p=cc.top_p, temperature=cc.temperature,
                          generator=self.generator)
        return beam_search(step, images.shape[0], self.sot, self.eot, max_len, beam_size=cc.beam_size,
                           length_penalty=cc.length_penalty)

    def text(self, ids: list[int]) -> str:
        return decoded_text(self.tokenizer, ids)

    def decoding(self) -> dict[str, Any]:
        cc = self.cfg.caption
        if cc.sampling:
            return {"decoding": "nucleus sampling", "top_p": cc.top_p, "temperature": cc.temperature, "max_len": cc.max_len}
        return {"decoding": "beam search" if cc.beam_size > 1 else "greedy", "beam_size": cc.beam_size,
                "length_penalty": cc.length_penalty, "max_len": cc.max_len}


class Caption(Captioner):
    predictions_file = "captions_results.json"

    def references(self, batch: dict[str, Any], i: int) -> list[str]:
        refs = (batch.get("captions") or [None] * len(batch["__key__"]))[i]
        if isinstance(refs, list) and refs:
            return [str(r) for r in refs]
        caption = batch["caption"][i]
        return [caption] if caption else []

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        chosen, keep = [], []
        for i in range(len(batch["__key__"])):
            refs = self.references(batch, i)
            if refs and batch["has_image"][i]:
                chosen.append(refs[int(torch.randint(len(refs), (1,), generator=self.generator))])
                keep.append(i)
        if not keep:  # nothing to caption on this rank: a zero loss that still reaches every trained weight
            return sum(p.sum() for p in self.decoder.parameters()) * 0.0
        tokens = self.tokenizer(chosen).to(batch["image"].device)
        return self.teacher_forcing_loss(batch["image"][keep], tokens)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        keep = [i for i in range(len(batch["__key__"])) if batch["has_image"][i]]
        if not keep:
            return []
        generated = self.generate(batch["image"][keep])
        image_ids = batch.get("image_id") or [None] * len(batch["__key__"])
        return [{"key": batch["__key__"][i], "image_id": image_ids[i] if image_ids[i] is not None else batch["__key__"][i],
                 "caption": self.text(ids), "references": self.references(batch, i)} for i, ids in zip(keep, generated)]

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        from finetune.metrics.caption import caption_scores

        scored = [r for r in records if r["references"]]
        if not scored:
            raise ValueError("caption evaluation found no reference captions (json captions field or caption member)")
        predictions = {r["image_id"]: r["caption"] for r in scored}
        references = {r["image_id"]: r["references"] for r in scored}
        return {"samples": float(len(scored)), **caption_scores(predictions, references)}

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from finetune.metrics.caption import coco_results

        return coco_results({r["image_id"]: r["caption"] for r in records})

    def card(self) -> dict[str, Any]:
        return {**self.decoding(), "decoder_layers": self.cfg.caption.layers,
                "metrics": "pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE left out: it cannot run offline)"}


def decoded_text(tokenizer, ids: list[int]) -> str:
    """The text of one generated token sequence, decoded whole. Byte-level tokens a model emits that form no UTF-8
    character are dropped rather than shown as U+FFFD (which caption metrics cannot tokenize)."""
    return " ".join(tokenizer.decode(ids).replace("\ufffd", " ").split())

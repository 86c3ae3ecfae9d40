"""Multimodal classification (e.g. sentiment from image + text + audio) with a selectable fusion strategy.

- ``early``: the modalities' embeddings (zeros where absent) and presence flags, concatenated, into one MLP head;
- ``late``: one linear head per modality, logits averaged over the modalities a sample has;
- ``hybrid``: both, logits summed;
- ``cross_attention``: the pre-trained fusion encoder, the caption's tokens attending to the image and audio
  tokens (absent ones masked), pooled at the end-of-text token, into a linear head.

Training drops each present modality of a sample with probability ``modality_dropout`` (never all of them), and
evaluation also reports the accuracy with each modality removed from every sample.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.tasks.base import Task, TaskContext, tokens_of
from finetune.tasks.zeroshot import classnames_from_metas
from mmfuse.schema import ConfigError


class Classify(Task):
    predictions_file = "predictions.jsonl"

    def __init__(self, cfg, backbone, context: TaskContext):
        super().__init__(cfg, backbone, context)
        conf = cfg.classify
        self.modalities, self.fusion_kind = list(conf.modalities), conf.fusion
        metas = (context.train_data or context.eval_data).metas()
        self.classnames = classnames_from_metas(metas)
        labels = [m["label"] for m in metas if isinstance(m.get("label"), int) and m["label"] >= 0]
        self.num_classes = conf.num_classes or (max(labels) + 1 if labels else 0)
        if self.num_classes < 2:
            raise ConfigError("classify needs at least 2 classes: set classify.num_classes or use data with json labels")
        dim, n = backbone.cfg.embed_dim, len(self.modalities)
        if self.fusion_kind in ("early", "hybrid"):
            self.early = nn.Sequential(nn.Linear(n * dim + n, 2 * dim), nn.GELU(), nn.Linear(2 * dim, self.num_classes))
        if self.fusion_kind in ("late", "hybrid"):
            self.late = nn.ModuleDict({m: nn.Linear(dim, self.num_classes) for m in self.modalities})
        if self.fusion_kind == "cross_attention":
            self.cross = nn.Linear(backbone.cfg.fusion.width, self.num_classes)

    def backbone_parts(self) -> list[str]:
        if self.fusion_kind == "cross_attention":
            return sorted({*self.modalities, "text", "fusion"})
        return list(self.modalities)

    def may_skip_parameters(self) -> bool:
        if self.fusion_kind == "cross_attention":
            # Token outputs: a trainable tower's projection goes unread, and so does the fusion input of a modality
            # that is not classified; with the towers frozen and every context read, every trainable one is read.
            outside = any(p.requires_grad for name, p in self.backbone.named_parameters() if not name.startswith("fusion."))
            contexts = {m for m in ("image", "audio") if m in self.modalities} or {"image"}
            return outside or set(self.backbone.fusion.context_in) != contexts
        # A tower trains only on the ranks whose batch has its modality; the heads read every step (an absent
        # modality's embedding is zeros, its late head's logits are masked, not skipped).
        return any(p.requires_grad for p in self.backbone.parameters())

    def logits(self, batch: dict[str, Any], present: dict[str, torch.Tensor]) -> torch.Tensor:
        size, device = len(batch["__key__"]), batch["label"].device
        if self.fusion_kind == "cross_attention":
            return self.cross_attention_logits(batch, present)
        embedded = {}
        for m in self.modalities:
            out = torch.zeros(size, self.backbone.cfg.embed_dim, device=device)
            keep = present[m].nonzero().squeeze(1)
            if keep.numel():
                out = out.index_put((keep,), self.backbone.embed(m, batch[m][keep]).to(out.dtype))
            embedded[m] = out
        logits = torch.zeros(size, self.num_classes, device=device)
        if self.fusion_kind in ("early", "hybrid"):
            flags = torch.stack([present[m].float() for m in self.modalities], dim=1)
            logits = logits + self.early(torch.cat([*embedded.values(), flags], dim=1))
        if self.fusion_kind in ("late", "hybrid"):
            count = torch.stack([present[m] for m in self.modalities]).sum(0).clamp(min=1).unsqueeze(1)
            late = sum(self.late[m](embedded[m]) * present[m].unsqueeze(1) for m in self.modalities)
            logits = logits + late / count
        return logits

    def cross_attention_logits(self, batch: dict[str, Any], present: dict[str, torch.Tensor]) -> torch.Tensor:
        size = len(batch["__key__"])
        text = batch["text"]
        has_text = present.get("text", torch.zeros(size, dtype=torch.bool, device=text.device))
        if not has_text.all():  # an absent caption is the empty caption (start and end tokens only)
            empty = self.tokenizer([""]).to(text.device).expand(size, -1)
            text = torch.where(has_text.unsqueeze(1), text, empty)
        query = self.backbone.encode_text(text, causal=False).tokens
        contexts, padding = {}, {}
        for m in ("image", "audio"):
            if m in self.modalities:
                contexts[m] = (self.backbone.encode_image if m == "image" else self.backbone.encode_audio)(batch[m]).tokens
                padding[m] = (~present[m]).unsqueeze(1).expand(-1, contexts[m].shape[1])
        if not contexts:
            contexts = {"image": query.new_zeros(size, 1, self.backbone.cfg.image.width)}
            padding = {"image": torch.ones(size, 1, dtype=torch.bool, device=text.device)}
        fused = self.backbone.fusion(query, contexts, text_padding=text == 0, context_padding=padding)
        return self.cross(tokens_of(fused, text))

    def present(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {m: batch[f"has_{m}"].clone() for m in self.modalities}

    def drop_modalities(self, present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = self.cfg.classify.modality_dropout
        if p <= 0 or len(self.modalities) < 2:
            return present
        stacked = torch.stack([present[m] for m in self.modalities], dim=1)
        dropped = stacked & (torch.rand(stacked.shape, generator=self.generator) >= p).to(stacked.device)
        # Never drop every modality of a sample: keep the original when nothing would remain.
        dropped = torch.where(dropped.any(dim=1, keepdim=True), dropped, stacked)
        return {m: dropped[:, i] for i, m in enumerate(self.modalities)}

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        present = self.drop_modalities(self.present(batch))
        usable = (batch["label"] >= 0) & torch.stack(list(present.values())).any(0)
        logits = self.logits(batch, present)
        return F.cross_entropy(logits[usable], batch["label"][usable])

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        full = self.present(batch)
        out = [{"key": k, "label": int(label)} for k, label in zip(batch["__key__"], batch["label"].tolist())]
        variants = {"prediction": full}
        if len(self.modalities) > 1:
            for m in self.modalities:
                variants[f"without_{m}"] = {**full, m: torch.zeros_like(full[m])}
        for name, present in variants.items():
            predicted = self.logits(batch, present).argmax(dim=1).tolist()
            usable = torch.stack(list(present.values())).any(0).tolist()
            for record, p, ok in zip(out, predicted, usable):
                record[name] = p if ok else -1
        return out

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        labelled = [r for r in records if r["label"] >= 0]
        if not labelled:
            raise ValueError("classify evaluation found no labelled samples (json label field) in the eval data")
        metrics = {"samples": float(len(labelled))}
        for name in [k for k in labelled[0] if k == "prediction" or k.startswith("without_")]:
            correct = sum(r[name] == r["label"] for r in labelled)
            prefix = "" if name == "prediction" else f"{name}/"
            metrics[f"{prefix}accuracy"] = 100.0 * correct / len(labelled)
        return metrics

    def card(self) -> dict[str, Any]:
        return {"fusion": self.fusion_kind, "modalities": self.modalities, "classes": self.num_classes,
                "modality_dropout": self.cfg.classify.modality_dropout}

    def chance(self) -> dict[str, float]:
        chance = 100.0 / self.num_classes
        return {"accuracy": chance, **{f"without_{m}/accuracy": chance for m in self.modalities}}

"""Cross-modal retrieval (image↔text, audio↔text, image↔audio): R@1/5/10 in both directions.

With ``all_captions`` and samples that carry several reference captions (COCO's protocol), the text gallery holds
every caption: an image query hits when any of its own captions is in the top k; a caption query hits when its
own image is. Similarities are computed a chunk of queries at a time, so a large gallery fits in memory.
Fine-tuning trains the contrastive loss of pre-training on the configured pairs (negatives from every rank).
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.tasks.base import Task, TaskContext, register, rows
from pretrain.evaluate import embed_rows
from pretrain.objectives.contrastive import MAX_LOG_SCALE, clip_loss, siglip_loss
from pretrain.objectives.gather import DistContext


def recall_at_k(queries: torch.Tensor, gallery: torch.Tensor, targets: list[torch.Tensor], ks=(1, 5, 10),
                chunk: int = 1024) -> dict[str, float]:
    """R@k (%) of each query ``[Q, D]`` against ``gallery`` ``[G, D]``; ``targets[q]`` holds the gallery indices
    that count as a hit for query q. A tie with the best target counts in its favour."""
    hits = {k: 0 for k in ks}
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start:start + chunk] @ gallery.T
        for row, q in zip(similarity, range(start, start + similarity.shape[0])):
            best = row[targets[q]].max()
            rank = int((row > best).sum())  # gallery items strictly better than the best target
            for k in ks:
                hits[k] += rank < k
    return {f"R@{k}": 100.0 * hits[k] / max(1, queries.shape[0]) for k in ks}


@register("retrieval")
class Retrieval(Task):
    predictions_file = "rankings.json"

    def __init__(self, cfg, backbone, context: TaskContext):
        super().__init__(cfg, backbone, context)
        self.pairs = [tuple(p.split("_")) for p in cfg.retrieval.pairs]
        self.modalities = sorted({m for pair in self.pairs for m in pair})

    def backbone_parts(self) -> list[str]:
        return [*self.modalities, "temperature"]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        import torch.distributed as dist

        ctx = DistContext(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else DistContext()
        scale = self.backbone.logit_scale.clamp(0, MAX_LOG_SCALE).exp()
        total = self.backbone.logit_scale.sum() * 0.0  # a tensor even when no pair is present
        for a, b in self.pairs:
            both = (batch[f"has_{a}"] & batch[f"has_{b}"]).nonzero().squeeze(1)
            if ctx.all_sum(torch.tensor(float(both.numel()), device=both.device)).item() == 0:
                continue  # no rank has this pair in this batch
            ea, eb = (self.backbone.embed(m, batch[m][both]) for m in (a, b))
            if self.backbone.logit_bias is not None:
                total = total + siglip_loss(ea, eb, scale, self.backbone.logit_bias, ctx)
            else:
                total = total + clip_loss(ea, eb, scale, ctx)
        return total

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        out = [{"key": k} for k in batch["__key__"]]
        for modality in self.modalities:
            keep = rows(batch, modality)
            if keep.numel():
                embedded = embed_rows(self.backbone, modality, batch, keep).float().cpu()  # long clips: pooled
                for j, i in enumerate(keep.tolist()):
                    out[i][modality] = embedded[j]
        captions = batch.get("captions")
        if "text" in self.modalities and self.cfg.retrieval.all_captions and captions is not None:
            for i, refs in enumerate(captions):
                if isinstance(refs, list) and refs:
                    out[i]["captions"] = self.backbone.embed("text", self.tokenizer(refs)).float().cpu()
        return out

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        metrics: dict[str, float] = {"samples": float(len(records))}
        self.scored = len(records)
        for a, b in self.pairs:
            both = [r for r in records if a in r and b in r]
            if len(both) < 2:
                continue
            queries = torch.stack([r[a] for r in both])
            if b == "text" and all("captions" in r for r in both):
                gallery = torch.cat([r["captions"] for r in both])
                owner = torch.cat([torch.full((r["captions"].shape[0],), i) for i, r in enumerate(both)])
                to_text = [(owner == i).nonzero().squeeze(1) for i in range(len(both))]
                to_a = [owner[j:j + 1] for j in range(gallery.shape[0])]
            else:
                gallery = torch.stack([r[b] for r in both])
                to_text = to_a = [torch.tensor([i]) for i in range(len(both))]
            chunk = self.cfg.retrieval.chunk
            for name, value in recall_at_k(queries, gallery, to_text, chunk=chunk).items():
                metrics[f"{a}_to_{b}/{name}"] = value
            for name, value in recall_at_k(gallery, queries, to_a, chunk=chunk).items():
                metrics[f"{b}_to_{a}/{name}"] = value
        recalls = [v for k, v in metrics.items() if "/R@" in k]
        if recalls:
            metrics["mean_recall"] = sum(recalls) / len(recalls)  # RSUM / its count: one number per checkpoint
        return metrics

    def predictions(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """For each pair, each query's top-10 gallery keys (single-caption galleries)."""
        out: dict[str, Any] = {}
        for a, b in self.pairs:
            both = [r for r in records if a in r and b in r]
            if len(both) < 2:
                continue
            keys = [r["key"] for r in both]
            similarity = torch.stack([r[a] for r in both]) @ torch.stack([r[b] for r in both]).T
            top = similarity.topk(min(10, len(keys)), dim=1).indices
            out[f"{a}_to_{b}"] = {keys[i]: [keys[j] for j in top[i].tolist()] for i in range(len(keys))}
        return out

    def chance(self) -> dict[str, float]:
        n = max(1, getattr(self, "scored", 1))
        return {f"{a}_to_{b}/R@{k}": min(100.0, 100.0 * k / n) for a in ("image", "text", "audio")
                for b in ("image", "text", "audio") if a != b for k in (1, 5, 10)}

    def card(self) -> dict[str, Any]:
        return {"pairs": [f"{a}_{b}" for a, b in self.pairs], "all_captions": self.cfg.retrieval.all_captions}

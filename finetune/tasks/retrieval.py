"""Cross-modal retrieval (image↔text, audio↔text, image↔audio): R@1/5/10 in both directions.

With ``all_captions`` and samples that carry several reference captions (COCO's protocol), the text gallery holds
every caption: an image query hits when any of its own captions is in the top k; a caption query hits when its
own image is. Similarities are computed a chunk of queries at a time, so a large gallery fits in memory.
Fine-tuning trains the contrastive loss of pre-training on the configured pairs (negatives from every rank).

Where one caption text belongs to several samples ("a red circle" under many images), a caption query can only
hit its own sample's image although the others match it as well. The ``unique_text/`` rows count once per
distinct text instead: text→image has a query per distinct text that hits when any of its samples is in the top
k; image→text ranks the distinct texts. The per-sample rows keep their meaning, and ``mean_recall`` averages
only them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from finetune.tasks.base import Task, TaskContext, rows
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


def distinct_texts(texts: list[str], owner: list[int], samples: int) -> tuple[list[int], list[torch.Tensor],
                                                                                   list[torch.Tensor]]:
    """Text gallery rows ``texts`` (row j belongs to sample ``owner[j]``) grouped by their string: (the first row
    of each distinct text, for each distinct text the samples it belongs to, for each sample its distinct texts)."""
    index: dict[str, int] = {}
    first: list[int] = []
    samples_of: list[set[int]] = []
    texts_of: list[set[int]] = [set() for _ in range(samples)]
    for row, (text, sample) in enumerate(zip(texts, owner)):
        if text not in index:
            index[text] = len(first)
            first.append(row)
            samples_of.append(set())
        samples_of[index[text]].add(sample)
        texts_of[sample].add(index[text])
    as_tensor = lambda groups: [torch.tensor(sorted(g), dtype=torch.long) for g in groups]
    return first, as_tensor(samples_of), as_tensor(texts_of)


def chance_recall(gallery: int, targets: list[int], k: int) -> float:
    """R@k (%) of a random ranking: a query with t targets in a gallery of ``gallery`` misses when all k picks
    fall among the other gallery - t."""
    misses = [math.comb(gallery - t, k) / math.comb(gallery, k) if k <= gallery else 0.0 for t in targets]
    return 100.0 * (1 - sum(misses) / max(1, len(misses)))


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
        if "text" in self.modalities and batch.get("caption") is not None:
            for i in rows(batch, "text").tolist():  # the strings, to count repeated captions once (unique_text/)
                out[i]["caption"] = batch["caption"][i]
        captions = batch.get("captions")
        if "text" in self.modalities and self.cfg.retrieval.all_captions and captions is not None:
            for i, refs in enumerate(captions):
                if isinstance(refs, list) and refs:
                    out[i]["captions"] = self.backbone.embed("text", self.tokenizer(refs)).float().cpu()
                    out[i]["references"] = list(refs)
        return out

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        metrics: dict[str, float] = {"samples": float(len(records))}
        self.scored = len(records)
        self.distinct: dict[str, dict[str, Any]] = {}  # per pair with repeated captions: counts and chance levels
        distinct_metrics: dict[str, float] = {}
        for a, b in self.pairs:
            both = [r for r in records if a in r and b in r]
            if len(both) < 2:
                continue
            queries = torch.stack([r[a] for r in both])
            texts = None
            if b == "text" and all("captions" in r for r in both):
                gallery = torch.cat([r["captions"] for r in both])
                owner = torch.cat([torch.full((r["captions"].shape[0],), i) for i, r in enumerate(both)])
                to_text = [(owner == i).nonzero().squeeze(1) for i in range(len(both))]
                to_a = [owner[j:j + 1] for j in range(gallery.shape[0])]
                if all("references" in r for r in both):
                    texts = [t for r in both for t in r["references"]]
            else:
                gallery = torch.stack([r[b] for r in both])
                owner = torch.arange(len(both))
                to_text = to_a = [torch.tensor([i]) for i in range(len(both))]
                if b == "text" and all("caption" in r for r in both):
                    texts = [r["caption"] for r in both]
            chunk = self.cfg.retrieval.chunk
            for name, value in recall_at_k(queries, gallery, to_text, chunk=chunk).items():
                metrics[f"{a}_to_{b}/{name}"] = value
            for name, value in recall_at_k(gallery, queries, to_a, chunk=chunk).items():
                metrics[f"{b}_to_{a}/{name}"] = value
            if texts is not None and len(set(texts)) < len(texts):
                distinct_metrics.update(self.score_distinct_texts(a, queries, gallery, texts, owner.tolist()))
        recalls = [v for k, v in metrics.items() if "/R@" in k]
        if recalls:
            metrics["mean_recall"] = sum(recalls) / len(recalls)  # RSUM / its count: one number per checkpoint
        metrics.update(distinct_metrics)  # after mean_recall, which stays the mean of the per-sample rows
        return metrics

    def score_distinct_texts(self, a: str, queries: torch.Tensor, gallery: torch.Tensor, texts: list[str],
                             owner: list[int], ks=(1, 5, 10)) -> dict[str, float]:
        """The ``unique_text/`` rows of pair (a, text): a text query per distinct caption string, a hit when any
        sample with that caption is in the top k; ``a`` queries rank the distinct captions."""
        first, samples_of, texts_of = distinct_texts(texts, owner, queries.shape[0])
        unique = gallery[first]
        chunk = self.cfg.retrieval.chunk
        out = {f"unique_text/{a}_to_text/{name}": value
               for name, value in recall_at_k(queries, unique, texts_of, ks, chunk).items()}
        out.update({f"unique_text/text_to_{a}/{name}": value
                    for name, value in recall_at_k(unique, queries, samples_of, ks, chunk).items()})
        chance = {}
        for k in ks:
            chance[f"unique_text/{a}_to_text/R@{k}"] = chance_recall(len(first), [len(t) for t in texts_of], k)
            chance[f"unique_text/text_to_{a}/R@{k}"] = chance_recall(queries.shape[0], [len(s) for s in samples_of], k)
        self.distinct[a] = {"captions": len(texts), "distinct": len(first), "samples": queries.shape[0],
                            "chance": chance}
        return out

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
        chance = {f"{a}_to_{b}/R@{k}": min(100.0, 100.0 * k / n) for a in ("image", "text", "audio")
                  for b in ("image", "text", "audio") if a != b for k in (1, 5, 10)}
        for counts in getattr(self, "distinct", {}).values():
            chance.update(counts["chance"])
        return chance

    def card(self) -> dict[str, Any]:
        return {"pairs": [f"{a}_{b}" for a, b in self.pairs], "all_captions": self.cfg.retrieval.all_captions}

    def details(self, records: list[dict[str, Any]], run_dir: Path) -> list[str]:
        distinct = getattr(self, "distinct", {})
        if not distinct:
            return []
        counts = "; ".join(f"{a}_text: {c['samples']} samples, {c['captions']} captions, {c['distinct']} distinct"
                           for a, c in distinct.items())
        return ["## Repeated captions: per sample and per distinct text", "",
                f"Some caption texts belong to several samples ({counts}), so the recall is counted two ways:", "",
                "- `image_to_text/R@k`, `text_to_image/R@k` (audio likewise): per sample. A caption query hits only "
                "when its own sample is in the top k, although the other samples with the same text match it as "
                "well; the text gallery holds every caption, repeats included. `mean_recall` averages these rows.",
                "- `unique_text/image_to_text/R@k`, `unique_text/text_to_image/R@k`: per distinct text. A query per "
                "distinct caption text hits when any sample with that text is in the top k; an image query ranks "
                "the distinct texts and hits on any of its own. Their chance column counts each query's targets.",
                ""]

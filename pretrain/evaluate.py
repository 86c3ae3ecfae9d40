"""In-loop evaluation: zero-shot classification (image and audio), cross-modal retrieval and the binding probe,
across ranks.

Each rank embeds its share of the held-out shards; the embeddings are gathered, de-duplicated by sample key and
scored once, so the numbers do not depend on the number of ranks.

The binding probe asks whether the model reads a caption as more than a bag of words: for each held-out caption with
two or more phrases ("a large red circle and a small blue star"), a copy with lined-up words swapped between two
phrases ("a small red circle and a large blue star", ``pretrain/objectives/negatives.py``) competes with it for the
sample's image or clip. ``eval/binding/image_to_text`` is the share of samples whose own caption wins: 50% is a bag
of words, 100% a model that knows which attribute goes with which object (the ARO benchmark's question).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.config import LoaderConfig
from data_pipeline.loader import build_loader
from data_pipeline.loader.sources import resolve_sources
from data_pipeline.loader.tarstream import iter_samples
from pretrain.config import DEFAULT_TEMPLATES, EvalConfig  # noqa: F401 (re-exported: they were defined here)
from pretrain.objectives.config import PHRASE_SEPARATORS
from pretrain.objectives.negatives import phrase_swaps

PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))
EMBEDDED = ("image", "text", "audio", "swapped")  # "swapped": the binding probe's copy of the caption


def recall_at_k(similarity: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Row i's match is column i. Returns R@k (in %) for each k; a tie with the match counts in its favour."""
    ranks = (similarity > similarity.diagonal().unsqueeze(1)).sum(dim=1)  # how many columns beat the match
    return {f"R@{k}": float((ranks < k).float().mean() * 100) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels.unsqueeze(1)
    out = {f"top{k}": float(hits[:, :k].any(dim=1).float().mean() * 100) for k in ks}
    recalls = [hits[labels == c, 0].float().mean() for c in labels.unique()]
    out["mean_per_class_recall"] = float(torch.stack(recalls).mean() * 100)
    return out


def text_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """``[C, D]``: mean of the normalised template embeddings per class, renormalised."""
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        rows.append(torch.nn.functional.normalize(model.embed("text", tokens).float().mean(0), dim=-1))
    return torch.stack(rows)


def swapped_captions(tokens: torch.Tensor, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The binding probe's ``(copies, valid)`` of caption ``tokens`` (``[N, L]``): the swap is drawn from each
    caption's own tokens, so a caption gets the same copy on any rank, in any batch, in every evaluation."""
    weights = torch.arange(1, tokens.shape[1] + 1, dtype=torch.long)
    draws = torch.stack([(tokens * weights).sum(1) % 997 / 997, (tokens * weights ** 2).sum(1) % 991 / 991], dim=1)
    separators = {token for word in PHRASE_SEPARATORS for token in tokenizer.encode(word)}
    return phrase_swaps(tokens, separators, tokenizer.eot_token_id, draws.float())


def embed_rows(model, modality: str, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Normalised embeddings of the batch rows ``rows`` (indices). An evaluation batch's audio clip longer than one
    window is embedded as the mean direction of its windows' embeddings (``audio_more`` holds the windows after
    each clip's first, ``audio_more_owner`` their rows): the whole clip counts, not its first seconds."""
    inputs = batch[modality][rows]
    more = batch.get("audio_more") if modality == "audio" else None
    if more is None or not more.shape[0]:
        return model.embed(modality, inputs)
    position = torch.full((batch["audio"].shape[0],), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(len(rows), device=rows.device)
    owner = position[batch["audio_more_owner"].to(rows.device)]  # each extra window's place among ``rows``
    picked = owner >= 0
    windows = torch.cat([inputs, more[picked.to(more.device)]])
    owners = torch.cat([torch.arange(len(rows), device=rows.device), owner[picked]])
    embedded = model.embed("audio", windows)
    pooled = torch.zeros_like(embedded[: len(rows)]).index_add_(0, owners.to(embedded.device), embedded)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def evaluate(model, data_cfg: LoaderConfig, eval_cfg: EvalConfig, rank: int, world_size: int, device,
             image_transform, tokenizer, image_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    cfg = dataclasses.replace(data_cfg, mode="exact", batch_size=eval_cfg.batch_size, require=[])
    loader = build_loader(cfg, rank, world_size, image_transform, tokenizer, image_size, train=False)
    local: dict[str, Any] = {"keys": [], "labels": []}
    embeddings: dict[str, list] = {m: [] for m in EMBEDDED}
    presence: dict[str, list] = {m: [] for m in EMBEDDED}
    probe = hasattr(tokenizer, "eot_token_id")  # open_clip's tokenizer: its token ids say where phrases end
    seen = 0
    dtype = next(model.parameters()).dtype  # bf16 / fp16 weights take inputs of their own dtype
    for batch in loader:
        inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()
                  if k in ("image", "text", "audio", "audio_more", "audio_more_owner")}
        for modality in ("image", "text", "audio"):
            has = batch[f"has_{modality}"]
            out = torch.zeros(has.shape[0], model.cfg.embed_dim)
            if has.any():
                out[has] = embed_rows(model, modality, inputs, has.nonzero().squeeze(1).to(device)).float().cpu()
            embeddings[modality].append(out)
            presence[modality].append(has)
        swapped = torch.zeros(batch["has_text"].shape[0], model.cfg.embed_dim)
        has = torch.zeros_like(batch["has_text"])
        if probe and batch["has_text"].any():
            copies, valid = swapped_captions(batch["text"][batch["has_text"]], tokenizer)
            has[batch["has_text"].nonzero().squeeze(1)[valid]] = True
            if valid.any():
                swapped[has] = model.embed("text", copies[valid].to(device)).float().cpu()
        embeddings["swapped"].append(swapped)
        presence["swapped"].append(has)
        local["keys"] += batch["__key__"]
        local["labels"].append(batch["label"])
        seen += len(batch["__key__"])
        if eval_cfg.max_samples and seen * world_size >= eval_cfg.max_samples:
            break
    local_tensors = {m: torch.cat(v) if v else torch.zeros(0, model.cfg.embed_dim) for m, v in embeddings.items()}
    local_presence = {m: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for m, v in presence.items()}
    shard = (local["keys"], torch.cat(local["labels"]) if local["labels"] else torch.zeros(0, dtype=torch.long),
             local_tensors, local_presence)
    parts = [shard]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, shard)
    # The class names are read on rank 0; the text classifier is embedded on every rank, in step (under ZeRO-3 a
    # forward gathers each layer's parameters from all ranks).
    names = [_classnames(eval_cfg, data_cfg) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(names, src=0)
    classifier = text_classifier(model, tokenizer, names[0], eval_cfg.templates, device).float().cpu() if names[0] else None
    metrics: dict[str, float] = {}
    if rank == 0:
        metrics = _score(parts, names[0], classifier)
    if world_size > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    model.train(was_training)
    return metrics


def _classnames(eval_cfg: EvalConfig, data_cfg: LoaderConfig) -> list[str]:
    if eval_cfg.classnames:
        return list(eval_cfg.classnames)
    return list(_label_names(data_cfg.train))


@functools.lru_cache(maxsize=8)
def _label_names(dataset: str) -> tuple[str, ...]:
    """label → label_name from the eval data's json members (the shapes world and most labelled shards carry it),
    read once per process: every in-loop evaluation asks again."""
    names: dict[int, str] = {}
    for source in resolve_sources(dataset):
        for shard in source.shards:
            for raw in iter_samples(shard.url, {"json"}, 1 << 20):
                meta = json.loads(raw.members.get("json", b"{}"))
                if isinstance(meta.get("label"), int) and meta.get("label_name"):
                    names[meta["label"]] = meta["label_name"]
    if not names:
        return ()
    return tuple(names.get(i, f"class {i}") for i in range(max(names) + 1))


def _score(parts, classnames: list[str], classifier: torch.Tensor | None) -> dict[str, float]:
    # Gather and de-duplicate by key (a sample is scored once, whichever rank saw it).
    order: dict[str, tuple[int, int]] = {}
    for p, (keys, _, _, _) in enumerate(parts):
        for i, key in enumerate(keys):
            order.setdefault(key, (p, i))
    keys = sorted(order)
    pick = lambda get: torch.stack([get(parts[p], i) for p, i in (order[k] for k in keys)]) if keys else torch.zeros(0)
    labels = pick(lambda part, i: part[1][i])
    embedded = {m: pick(lambda part, i, m=m: part[2][m][i]) for m in EMBEDDED}
    present = {m: pick(lambda part, i, m=m: part[3][m][i]) for m in EMBEDDED}
    metrics: dict[str, float] = {"eval/samples": float(len(keys))}
    for a, b in PAIRS:
        both = present[a] & present[b]
        if both.sum() < 2:
            continue
        similarity = embedded[a][both] @ embedded[b][both].T
        for name, value in recall_at_k(similarity).items():
            metrics[f"eval/retrieval/{a}_to_{b}/{name}"] = value
        for name, value in recall_at_k(similarity.T).items():
            metrics[f"eval/retrieval/{b}_to_{a}/{name}"] = value
    for modality in ("image", "audio"):
        rows = present[modality] & present["swapped"]
        if rows.any():
            own = (embedded[modality][rows] * embedded["text"][rows]).sum(1)
            copy = (embedded[modality][rows] * embedded["swapped"][rows]).sum(1)
            metrics[f"eval/binding/{modality}_to_text"] = float((own > copy).float().mean() * 100)
    if classifier is not None:
        for modality in ("image", "audio"):
            rows = present[modality] & (labels >= 0)
            if rows.sum() == 0:
                continue
            logits = embedded[modality][rows] @ classifier.T
            ks = (1, 5) if len(classnames) >= 5 else (1,)
            for name, value in topk_accuracy(logits, labels[rows], ks).items():
                metrics[f"eval/zeroshot/{modality}/{name}"] = value
        metrics["eval/zeroshot/chance_top1"] = 100.0 / len(classnames)
    return metrics

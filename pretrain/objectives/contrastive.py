"""Contrastive objective: CLIP (InfoNCE, learned temperature) or SigLIP (sigmoid, learned bias) over every
modality pair present, with the global batch across ranks as the negative set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.objectives.base import Forward
from pretrain.objectives.config import ContrastiveConfig, ObjectivesConfig
from pretrain.objectives.gather import DistContext, gather_rows, rows_per_rank
from pretrain.objectives.negatives import phrase_swaps

MAX_LOG_SCALE = 4.6052  # ln(100): CLIP clamps the temperature there


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, ctx: DistContext,
              sizes: list[int] | None = None, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``a`` and ``b`` (``[n, D]`` local, normalised). ``sizes``: every
    rank's row count if known (``rows_per_rank``), else exchanged here. ``negatives`` (``[m, D]``, local): more
    columns of the ``a`` → ``b`` direction, matching no row. Computed in fp32 whatever the weights'."""
    a, b, scale = a.float(), b.float(), scale.float()
    # One gather for both sides: their rows pair up, so the counts are the same.
    both, offset = gather_rows(torch.cat([a, b], dim=1), ctx, sizes)
    all_a, all_b = both.split([a.shape[1], b.shape[1]], dim=1)
    total = both.shape[0]
    labels = torch.arange(a.shape[0], device=a.device) + offset
    columns = all_b if negatives is None else torch.cat([all_b, negatives.float()])
    loss = F.cross_entropy(scale * a @ columns.T, labels, reduction="sum") + F.cross_entropy(scale * b @ all_a.T, labels, reduction="sum")
    return ctx.world_size * loss / (2 * total)


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, ctx: DistContext,
                sizes: list[int] | None = None, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid loss over every (local row, global column) pair: matches +1, all others -1 (in fp32); ``negatives``
    (``[m, D]``, local) are more columns, all -1."""
    a, b, scale, bias = a.float(), b.float(), scale.float(), bias.float()
    all_b, offset = gather_rows(b, ctx, sizes)
    total = all_b.shape[0]
    logits = scale * a @ all_b.T + bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(a.shape[0]), torch.arange(a.shape[0]) + offset] = 1.0
    loss = -F.logsigmoid(labels * logits).sum()
    if negatives is not None:
        loss = loss - F.logsigmoid(-(scale * a @ negatives.float().T + bias)).sum()
    return ctx.world_size * loss / total


class Contrastive:
    def __init__(self, cfg: ContrastiveConfig, objectives: ObjectivesConfig):
        self.cfg = cfg
        self.parts = {"temperature"} | {m for pair, w in cfg.pairs.items() if w > 0 for m in pair.split("_")}
        masked_ratio = {"image": objectives.masked_image, "audio": objectives.masked_audio}
        # With FLIP, reuse the masked objective's pass (same ratio) so each tower runs once per step.
        self.ratio = {
            m: (c.mask_ratio if c.weight > 0 else cfg.mask_ratio) if cfg.use_masked_forward else 0.0
            for m, c in masked_ratio.items()
        }
        self.separators: set[int] = set()
        if cfg.hard_negatives:
            from open_clip.tokenizer import SimpleTokenizer  # the training loader's tokenizer (pretrain/trainer.py)

            tokenizer = SimpleTokenizer()
            self.separators = {token for word in cfg.phrase_separators for token in tokenizer.encode(word)}
            self.end = tokenizer.eot_token_id

    def features(self, model, forward: Forward, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised embeddings of present samples, a presence-indexed map from batch row to feature row)."""
        if modality == "text":
            encoded = forward.text()
        else:
            encoded = forward.image(self.ratio["image"]) if modality == "image" else forward.audio(self.ratio["audio"])
        rows = forward.rows(modality)
        index = torch.full((forward.batch[f"has_{modality}"].shape[0],), -1, dtype=torch.long, device=rows.device)
        index[rows] = torch.arange(rows.shape[0], device=rows.device)
        return model.project(modality, encoded.pooled), index

    def negatives(self, model, forward: Forward) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(normalised embeddings of the hard negative captions, a text-row-indexed map to them, -1 where a caption
        has none), or None when no caption of this batch has one."""
        tokens = forward.batch["text"][forward.rows("text")]
        swapped, valid = phrase_swaps(tokens.cpu(), self.separators, self.end, torch.rand(tokens.shape[0], 2))
        if not valid.any():
            return None
        encoded = model.encode_text(forward.trimmed(swapped[valid].to(tokens.device)))
        index = torch.full((tokens.shape[0],), -1, dtype=torch.long, device=tokens.device)
        index[valid.to(tokens.device)] = torch.arange(int(valid.sum()), device=tokens.device)
        return model.project("text", encoded.pooled), index

    def __call__(self, model, batch, forward: Forward, ctx: DistContext) -> dict[str, torch.Tensor]:
        scale = model.logit_scale.clamp(0, MAX_LOG_SCALE).exp()
        pairs = [(pair, weight) for pair, weight in self.cfg.pairs.items() if weight > 0]
        # Every rank's row count of every pair, in one collective: it says which pairs some rank has, and spares
        # each gather its own size exchange (a synchronisation point each).
        present = [batch[f"has_{pair.split('_')[0]}"] & batch[f"has_{pair.split('_')[1]}"] for pair, _ in pairs]
        counts = rows_per_rank([int(rows.sum()) for rows in present], ctx, scale.device)
        losses, cache = {}, {}
        for i, (pair, weight) in enumerate(pairs):
            sizes = [row[i] for row in counts]
            if sum(sizes) == 0:
                continue  # no rank has this pair in this step
            first, second = pair.split("_")
            for modality in (first, second):
                if modality not in cache:
                    cache[modality] = self.features(model, forward, modality)
            (fa, ia), (fb, ib) = cache[first], cache[second]
            a, b = fa[ia[present[i]]], fb[ib[present[i]]]
            extra = None
            if second == "text" and self.separators:
                if "negatives" not in cache:
                    cache["negatives"] = self.negatives(model, forward)
                if cache["negatives"] is not None:
                    fn, index = cache["negatives"]
                    mine = index[ib[present[i]]]
                    extra = fn[mine[mine >= 0]]
            if model.logit_bias is not None:
                losses[f"contrastive/{pair}"] = weight * siglip_loss(a, b, scale, model.logit_bias, ctx, sizes, extra)
            else:
                losses[f"contrastive/{pair}"] = weight * clip_loss(a, b, scale, ctx, sizes, extra)
        return losses

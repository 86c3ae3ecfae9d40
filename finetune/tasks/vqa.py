"""Visual question answering.

``classify`` (the standard recipe): the answer vocabulary is the ``vqa.answers`` most frequent normalised training
answers; the question's tokens (bidirectional text pass) attend to the image tokens through the pre-trained fusion
encoder, the end-of-text token goes through an MLP to one logit per answer, trained with binary cross-entropy
against soft scores (min(1, annotators who gave the answer / 3)).
``generate``: the caption decoder continues the question with the answer (teacher forcing on "question answer"
with the loss on the answer tokens; greedy or beam decoding after the question).

Scored with the standard VQA accuracy (official answer normalisation, mean over the 10 leave-one-annotator-out
subsets); predictions in the official results format ``[{"question_id", "answer"}]``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.tasks.base import Task, TaskContext, register, tokens_of
from finetune.tasks.caption import Captioner
from mmfuse.schema import ConfigError


def _questions(batch: dict[str, Any]) -> list[int]:
    """Batch rows with an image and a question."""
    questions = batch.get("question") or [None] * len(batch["__key__"])
    return [i for i, q in enumerate(questions) if isinstance(q, str) and q and batch["has_image"][i]]


def _record(batch: dict[str, Any], i: int, answer: str) -> dict[str, Any]:
    qids = batch.get("question_id") or [None] * len(batch["__key__"])
    types = batch.get("question_type") or [None] * len(batch["__key__"])
    answers = (batch.get("answers") or [None] * len(batch["__key__"]))[i]
    return {"key": batch["__key__"][i], "question_id": qids[i] if qids[i] is not None else batch["__key__"][i],
            "question": batch["question"][i], "answer": answer, "answers": list(answers or []),
            "question_type": types[i] or ""}


def score_records(records: list[dict[str, Any]]) -> dict[str, float]:
    from finetune.metrics.vqa import vqa_score

    scored = [r for r in records if r["answers"]]
    if not scored:
        raise ValueError("VQA evaluation found no annotator answers (json answers field / VQA annotations)")
    result = vqa_score({r["question_id"]: r["answer"] for r in scored}, {r["question_id"]: r["answers"] for r in scored},
                       {r["question_id"]: r["question_type"] for r in scored})
    return {"samples": float(len(scored)), **result}


@register("vqa")
def build_vqa(cfg, backbone, context: TaskContext) -> Task:
    return (VqaClassifier if cfg.vqa.mode == "classify" else VqaGenerator)(cfg, backbone, context)


class VqaClassifier(Task):
    name = "vqa"
    predictions_file = "vqa_results.json"

    def __init__(self, cfg, backbone, context: TaskContext):
        super().__init__(cfg, backbone, context)
        from finetune.metrics.vqa import answer_vocab

        source = context.train_data or context.eval_data
        answer_lists = [m.get("answers") for m in source.metas() if isinstance(m.get("answers"), list)]
        if not answer_lists:
            raise ConfigError("vqa needs training data with annotator answers (json answers field / VQA annotations)")
        self.vocab = answer_vocab(answer_lists, cfg.vqa.answers)
        self.index = {a: i for i, a in enumerate(self.vocab)}
        width = backbone.cfg.fusion.width
        hidden = cfg.vqa.hidden or 2 * width
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, len(self.vocab)))

    def backbone_parts(self) -> list[str]:
        return ["image", "text", "fusion"]

    def logits(self, images: torch.Tensor, questions: list[str]) -> torch.Tensor:
        text = self.tokenizer(questions).to(images.device)
        query = self.backbone.encode_text(text, causal=False).tokens
        context = self.backbone.encode_image(images).tokens
        fused = self.backbone.fusion(query, {"image": context}, text_padding=text == 0)
        return self.head(tokens_of(fused, text))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        from finetune.metrics.vqa import soft_targets

        keep = _questions(batch)
        if not keep:
            return sum(p.sum() for p in self.head.parameters()) * 0.0
        logits = self.logits(batch["image"][keep], [batch["question"][i] for i in keep])
        targets = torch.zeros_like(logits)
        for row, i in enumerate(keep):
            for index, value in soft_targets(batch["answers"][i] or [], self.index).items():
                targets[row, index] = value
        # The usual VQA scaling: BCE summed over answers, averaged over questions.
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="mean") * len(self.vocab)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        keep = _questions(batch)
        if not keep:
            return []
        best = self.logits(batch["image"][keep], [batch["question"][i] for i in keep]).argmax(dim=1).tolist()
        return [_record(batch, i, self.vocab[b]) for i, b in zip(keep, best)]

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return score_records(records)

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in records]

    def chance(self) -> dict[str, float]:
        return {"accuracy": 100.0 / len(self.vocab)}  # a uniformly random answer from the vocabulary, at best

    def card(self) -> dict[str, Any]:
        return {"mode": "classify", "answer_vocabulary": len(self.vocab),
                "metric": "VQA accuracy (official normalisation, 10 leave-one-out annotator subsets)"}


class VqaGenerator(Captioner):
    name = "vqa"
    predictions_file = "vqa_results.json"

    def __init__(self, cfg, backbone, context: TaskContext):
        super().__init__(cfg, backbone, context)
        self.max_answer_tokens = 8

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        from finetune.metrics.vqa import normalize_answer

        keep = [i for i in _questions(batch) if batch["answers"][i]]
        if not keep:
            return sum(p.sum() for p in self.decoder.parameters()) * 0.0
        texts, starts = [], []
        for i in keep:
            answer = Counter(normalize_answer(a) for a in batch["answers"][i]).most_common(1)[0][0]
            texts.append(f"{batch['question'][i]} {answer}")
            starts.append(len(self.tokenizer.encode(batch["question"][i])) + 1)  # + the start token
        tokens = self.tokenizer(texts).to(batch["image"].device)
        # Loss on the answer tokens (and the end token) only: target position j predicts token j + 1.
        positions = torch.arange(tokens.shape[1] - 1, device=tokens.device).unsqueeze(0)
        weight = (positions >= torch.tensor(starts, device=tokens.device).unsqueeze(1) - 1) & (tokens[:, 1:] != 0)
        return self.teacher_forcing_loss(batch["image"][keep], tokens, weight)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        keep = _questions(batch)
        if not keep:
            return []
        prefixes = [self.tokenizer.encode(batch["question"][i]) for i in keep]
        generated = self.generate(batch["image"][keep], prefixes, max_len=self.max_answer_tokens)
        from finetune.metrics.vqa import normalize_answer

        return [_record(batch, i, normalize_answer(self.text(ids))) for i, ids in zip(keep, generated)]

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return score_records(records)

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in records]

    def card(self) -> dict[str, Any]:
        return {"mode": "generate", **self.decoding(), "answer_max_tokens": self.max_answer_tokens}

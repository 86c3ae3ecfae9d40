"""Visual question answering.

``classify`` (the standard recipe): the answer vocabulary is the ``vqa.answers`` most frequent normalised training
answers; the question's tokens (bidirectional text pass) attend to the image tokens through the pre-trained fusion
encoder, the end-of-text slot (by default given the mask embedding of pre-training's masked words, ``vqa.read``)
goes through an MLP to one logit per answer, trained with binary cross-entropy against soft scores (min(1,
annotators who gave the answer / 3)).
``generate``: the caption decoder continues the question with the answer (teacher forcing on "question answer"
with the loss on the answer tokens; greedy or beam decoding after the question).

Scored with the standard VQA accuracy (official answer normalisation, mean over the 10 leave-one-annotator-out
subsets), overall and per question / answer type; predictions in the official results format
``[{"question_id", "answer"}]``. Beside the model's answers, every question is also answered
- without the image (the same model on a blank, mean-colour image: the question alone), and
- by the text-only prior (the most frequent training answer for the same question string, else for its question
  type, else overall),
so the card shows at once whether the model reads the image: ``changed_without_image`` is the share of answers
that change when the image is blanked.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.tasks.base import Task, TaskContext, tokens_of
from finetune.tasks.caption import Captioner
from mmfuse.schema import ConfigError


def _questions(batch: dict[str, Any]) -> list[int]:
    """Batch rows with an image and a question."""
    questions = batch.get("question") or [None] * len(batch["__key__"])
    return [i for i, q in enumerate(questions) if isinstance(q, str) and q and batch["has_image"][i]]


def _field(batch: dict[str, Any], name: str) -> list:
    return batch.get(name) or [None] * len(batch["__key__"])


def _record(batch: dict[str, Any], i: int, answer: str, without_image: str, prior: str) -> dict[str, Any]:
    qid = _field(batch, "question_id")[i]
    return {"key": batch["__key__"][i], "question_id": qid if qid is not None else batch["__key__"][i],
            "question": batch["question"][i], "answer": answer, "answers": list(_field(batch, "answers")[i] or []),
            "question_type": _field(batch, "question_type")[i] or "", "answer_type": _field(batch, "answer_type")[i] or "",
            "without_image": without_image, "prior": prior}


class AnswerPrior:
    """The text-only prior: the most frequent (normalised) training answer for the same question string, else for
    the question's type, else over all training questions. What a model that ignores the image can reach."""

    def __init__(self, metas: list[dict[str, Any]]):
        from finetune.metrics.vqa import normalize_answer

        by_question: dict[str, Counter] = {}
        by_type: dict[str, Counter] = {}
        overall: Counter = Counter()
        for meta in metas:
            question, answers = meta.get("question"), meta.get("answers")
            if not isinstance(question, str) or not isinstance(answers, list):
                continue
            counts = Counter(normalize_answer(a) for a in answers)
            by_question.setdefault(question.strip().lower(), Counter()).update(counts)
            by_type.setdefault(meta.get("question_type") or "", Counter()).update(counts)
            overall.update(counts)
        best = lambda counts: min(counts.items(), key=lambda item: (-item[1], item[0]))[0] if counts else ""
        self.by_question = {q: best(c) for q, c in by_question.items()}
        self.by_type = {t: best(c) for t, c in by_type.items() if t}
        self.overall = best(overall)

    def __call__(self, question: str, question_type: str | None) -> str:
        return self.by_question.get(question.strip().lower()) or self.by_type.get(question_type or "") or self.overall


def answer_all(batch: dict[str, Any], answer, prior: AnswerPrior) -> list[dict[str, Any]]:
    """Records of the batch's questions: ``answer(images, questions) -> [str]`` with the image and with a blank
    one, and the prior's answer."""
    keep = _questions(batch)
    if not keep:
        return []
    images, questions = batch["image"][keep], [batch["question"][i] for i in keep]
    with_image, blank = answer(images, questions), answer(torch.zeros_like(images), questions)
    types = _field(batch, "question_type")
    return [_record(batch, i, a, b, prior(batch["question"][i], types[i])) for i, a, b in zip(keep, with_image, blank)]


def score_records(records: list[dict[str, Any]]) -> dict[str, float]:
    """VQA accuracy (overall, per question and answer type) of the model, of the model without the image and of the
    text-only prior, and the share of answers that change without the image."""
    from finetune.metrics.vqa import vqa_score

    scored = [r for r in records if r["answers"]]
    if not scored:
        raise ValueError("VQA evaluation found no annotator answers (json answers field / VQA annotations)")
    answers = {r["question_id"]: r["answers"] for r in scored}
    types = ({r["question_id"]: r["question_type"] for r in scored}, {r["question_id"]: r["answer_type"] for r in scored})
    metrics = {"samples": float(len(scored))}
    for field, prefix in (("answer", ""), ("without_image", "without_image/"), ("prior", "prior/")):
        result = vqa_score({r["question_id"]: r[field] for r in scored}, answers, *types)
        metrics.update({prefix + name: value for name, value in result.items()})
    metrics["changed_without_image"] = 100.0 * sum(r["answer"] != r["without_image"] for r in scored) / len(scored)
    return metrics


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
        self.prior = AnswerPrior(source.metas())
        self.index = {a: i for i, a in enumerate(self.vocab)}
        width = backbone.cfg.fusion.width
        hidden = cfg.vqa.hidden or 2 * width
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, len(self.vocab)))

    def backbone_parts(self) -> list[str]:
        return ["image", "text", "fusion"]

    def logits(self, images: torch.Tensor, questions: list[str]) -> torch.Tensor:
        text = self.tokenizer(questions).to(images.device)
        masked = None
        if self.cfg.vqa.read == "mask":  # the end-of-text slot becomes a masked word, as in pre-training
            masked = torch.zeros_like(text, dtype=torch.bool)
            masked[torch.arange(text.shape[0]), text.argmax(dim=-1)] = True
        query = self.backbone.encode_text(text, causal=False, masked=masked).tokens
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
        return answer_all(batch, lambda images, questions: [self.vocab[b] for b in
                                                            self.logits(images, questions).argmax(dim=1).tolist()],
                          self.prior)

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return score_records(records)

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in records]

    def chance(self) -> dict[str, float]:
        return {"accuracy": 100.0 / len(self.vocab)}  # a uniformly random answer from the vocabulary, at best

    def details(self, records: list[dict[str, Any]], run_dir) -> list[str]:
        return type_table(self.score(records))

    def card(self) -> dict[str, Any]:
        return {"mode": "classify", "answer_vocabulary": len(self.vocab),
                "metric": "VQA accuracy (official normalisation, 10 leave-one-out annotator subsets)"}


class VqaGenerator(Captioner):
    name = "vqa"
    predictions_file = "vqa_results.json"

    def __init__(self, cfg, backbone, context: TaskContext):
        super().__init__(cfg, backbone, context)
        self.max_answer_tokens = 8
        self.prior = AnswerPrior((context.train_data or context.eval_data).metas())

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
        from finetune.metrics.vqa import normalize_answer

        def answer(images: torch.Tensor, questions: list[str]) -> list[str]:
            prefixes = [self.tokenizer.encode(q) for q in questions]
            return [normalize_answer(self.text(ids)) for ids in self.generate(images, prefixes, max_len=self.max_answer_tokens)]

        return answer_all(batch, answer, self.prior)

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return score_records(records)

    def details(self, records: list[dict[str, Any]], run_dir) -> list[str]:
        return type_table(self.score(records))

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in records]

    def card(self) -> dict[str, Any]:
        return {"mode": "generate", **self.decoding(), "answer_max_tokens": self.max_answer_tokens}


def type_table(metrics: dict[str, float]) -> list[str]:
    """Markdown: accuracy per question type and answer type with the image, without it and from the prior."""
    kinds = sorted(k.removeprefix("accuracy/") for k in metrics if k.startswith("accuracy/"))
    lines = ["## Accuracy by question type", "",
             f"With the image, without it (a blank image: the question alone) and the text-only prior (most frequent "
             f"training answer for the question). Answers that change without the image: "
             f"{metrics['changed_without_image']:.1f}%.", "",
             "| type | with image % | without image % | text-only prior % |", "|---|---:|---:|---:|"]
    for kind in ["", *kinds]:
        key = f"accuracy/{kind}" if kind else "accuracy"
        lines.append(f"| {kind.replace('answer_type/', 'answer: ') or '**all**'} | {metrics[key]:.1f} | "
                     f"{metrics.get('without_image/' + key, float('nan')):.1f} | {metrics.get('prior/' + key, float('nan')):.1f} |")
    return lines

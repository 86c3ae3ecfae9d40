"""Image (or audio) classification from class names: zero-shot, linear probe, full fine-tuning, WiSE-FT.

Zero-shot: class names × prompt templates → the text tower → one normalised embedding per class (mean over
templates); an input's class is its nearest class embedding. Probing and fine-tuning start their linear head from
exactly that classifier (scaled by the learned temperature), so step 0 equals zero-shot, and WiSE-FT
(Wortsman et al.) interpolates every trained weight between the zero-shot and the fine-tuned model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmfuse.storage import filesystem

from mmfuse.redact import redact
from finetune.tasks.base import Task, TaskContext, rows
from mmfuse.schema import ConfigError
from pretrain.evaluate import DEFAULT_TEMPLATES, embed_rows, text_classifier, topk_accuracy


def classnames_from_metas(metas: list[dict]) -> list[str]:
    """Class names in label order from samples' ``label`` / ``label_name`` fields ([] if there are none)."""
    names: dict[int, str] = {}
    for meta in metas:
        if isinstance(meta.get("label"), int) and meta.get("label_name"):
            names[meta["label"]] = meta["label_name"]
    return [names.get(i, f"class {i}") for i in range(max(names) + 1)] if names else []


def load_classnames(configured: list[str], file: str, metas: list[dict]) -> list[str]:
    if configured:
        return list(configured)
    if file:
        fs, inner = filesystem(file)
        if not fs.exists(inner):
            raise ValueError(f"classnames_file {redact(file)!r} does not exist")
        text = fs.cat_file(inner).decode()
        return json.loads(text) if file.endswith(".json") else [line.strip() for line in text.splitlines() if line.strip()]
    names = classnames_from_metas(metas)
    if not names:
        raise ConfigError("zero-shot classification needs class names: set zeroshot.classnames or "
                          "zeroshot.classnames_file, or use data whose samples carry label and label_name")
    return names


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    ks = (1, 5) if logits.shape[1] >= 5 else (1,)
    return {f"{prefix}{name}": value for name, value in topk_accuracy(logits, labels, ks).items()}


class ZeroShot(Task):
    predictions_file = "predictions.jsonl"

    def __init__(self, cfg, backbone, context: TaskContext):
        super().__init__(cfg, backbone, context)
        zs = cfg.zeroshot
        data = context.train_data or context.eval_data
        self.modality, self.templates, self.templates_source = zs.modality, list(zs.templates), context.templates_source
        if not self.templates:
            self.templates, self.templates_source = list(DEFAULT_TEMPLATES), "default (CLIP-style)"
        self.classnames = load_classnames(zs.classnames, zs.classnames_file, data.metas())
        with torch.no_grad():
            classifier = text_classifier(backbone, self.tokenizer, self.classnames, self.templates, torch.device("cpu"))
            scale = backbone.logit_scale.detach().exp().reshape(())
        # The linear head starts as the zero-shot classifier: logits = scale * <x, class embedding>.
        self.head = nn.Linear(classifier.shape[1], len(self.classnames))
        with torch.no_grad():
            self.head.weight.copy_(scale * classifier)
            self.head.bias.zero_()
        self.zero_shot_state: dict[str, torch.Tensor] | None = None

    def backbone_parts(self) -> list[str]:
        return [self.modality] if self.cfg.zeroshot.train == "full" else []

    def before_training(self) -> None:
        """Keep the starting weights of everything that trains (for WiSE-FT)."""
        self.zero_shot_state = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def after_training(self) -> str | None:
        if self.cfg.zeroshot.wise_ft < 0:
            return None
        self.wise_ft(self.cfg.zeroshot.wise_ft)
        return "wise_ft"

    @torch.no_grad()
    def wise_ft(self, alpha: float) -> None:
        """Weights ← (1 - alpha) x zero-shot + alpha x fine-tuned, in place."""
        for name, param in self.named_parameters():
            if self.zero_shot_state is not None and name in self.zero_shot_state:
                param.copy_((1 - alpha) * self.zero_shot_state[name] + alpha * param)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.embed(self.modality, inputs))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        keep = rows(batch, self.modality)
        keep = keep[batch["label"][keep] >= 0]
        return F.cross_entropy(self.logits(batch[self.modality][keep]), batch["label"][keep])

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        keep = rows(batch, self.modality)
        # A long clip counts whole: the head reads the pooled embedding of its windows.
        logits = torch.zeros(0)
        if keep.numel():
            logits = self.head(embed_rows(self.backbone, self.modality, batch, keep)).float().cpu()
        out = []
        for j, i in enumerate(keep.tolist()):
            out.append({"key": batch["__key__"][i], "label": int(batch["label"][i]), "logits": logits[j],
                        "prediction": int(logits[j].argmax())})
        return out

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        labelled = [r for r in records if r["label"] >= 0]
        if not labelled:
            raise ValueError("zero-shot evaluation found no labelled samples (json label field) in the eval data")
        logits = torch.stack([r["logits"] for r in labelled])
        labels = torch.tensor([r["label"] for r in labelled])
        return {"samples": float(len(labelled)), **classification_metrics(logits, labels, "")}

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"key": r["key"], "label": r["label"], "prediction": r["prediction"],
                 "class": self.classnames[r["prediction"]]} for r in records]

    def card(self) -> dict[str, Any]:
        zs = self.cfg.zeroshot
        return {"modality": self.modality, "classes": len(self.classnames), "templates": self.templates,
                "templates_from": self.templates_source,
                "training": zs.train, "wise_ft": zs.wise_ft if zs.wise_ft >= 0 else "off"}

    def chance(self) -> dict[str, float]:
        return {"top1": 100.0 / len(self.classnames)}

    def details(self, records: list[dict[str, Any]], run_dir: Path) -> list[str]:
        """Per-class recall with class names (worst first) and a confusion matrix PNG."""
        from mmfuse.plots import confusion_matrix

        labelled = [r for r in records if r["label"] >= 0]
        labels = [r["label"] for r in labelled]
        predicted = [r["prediction"] for r in labelled]
        confusion_matrix(labels, predicted, self.classnames, run_dir / "confusion.png",
                         title=f"zero-shot {self.modality}: true class per row")
        lines = ["## Per-class recall", "", "![confusion matrix](confusion.png)", "",
                 "| class | samples | recall % | most often predicted instead |", "|---|---:|---:|---|"]
        for name, total, recall, confused in per_class_recall(labels, predicted, self.classnames):
            lines.append(f"| {name} | {total} | {recall:.1f} | {confused} |")
        return lines


def per_class_recall(labels: list[int], predicted: list[int], classnames: list[str]) -> list[tuple[str, int, float, str]]:
    """(class name, samples, recall %, the wrong class predicted most often or "") per class present, worst first."""
    out = []
    for c, name in enumerate(classnames):
        mine = [p for label, p in zip(labels, predicted) if label == c]
        if not mine:
            continue
        wrong = Counter(p for p in mine if p != c).most_common(1)
        out.append((name, len(mine), 100.0 * mine.count(c) / len(mine), classnames[wrong[0][0]] if wrong else ""))
    return sorted(out, key=lambda row: (row[2], row[0]))


@torch.no_grad()
def zero_shot_accuracy(backbone, tokenizer, data, classnames: list[str], templates: list[str], modality: str,
                       rank: int, world: int) -> dict[str, float]:
    """Zero-shot top-1/top-5 of ``backbone`` on ``data`` (a TaskData), gathered over ranks (zero-shot retention)."""
    from finetune.evaluation import gather_records

    device = next(backbone.parameters()).device
    classifier = text_classifier(backbone, tokenizer, classnames, templates, device)
    records = []
    for batch in data:
        keep = rows(batch, modality)
        if keep.numel():
            logits = (embed_rows(backbone, modality, batch, keep).float() @ classifier.float().T).cpu()
            records += [{"key": batch["__key__"][i], "label": int(batch["label"][i]), "logits": logits[j]}
                        for j, i in enumerate(keep.tolist())]
    records = [r for r in gather_records(records, rank, world) if r["label"] >= 0]
    if not records:
        return {}
    return classification_metrics(torch.stack([r["logits"] for r in records]), torch.tensor([r["label"] for r in records]), "")

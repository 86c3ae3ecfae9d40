"""The task contract (the registry is ``finetune.tasks.TASKS``).

A task is an ``nn.Module`` around the pre-trained backbone (``MultimodalModel``) plus its new heads:
``forward(batch)`` returns the training loss (so DDP / DeepSpeed wrap it as is); ``predict(batch)`` returns one
JSON-able record per sample (with its ``key``); ``score(records)`` turns the gathered, de-duplicated records of
the whole eval set into metrics; ``predictions(records)`` is what gets written in the task's standard format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from finetune.config import FinetuneConfig

@dataclass
class TaskContext:
    """What a task may need beyond its config: the tokenizer and the data (for class names, answer vocabularies)."""

    tokenizer: Callable
    train_data: Any  # TaskData or None
    eval_data: Any  # TaskData
    templates_source: str = "config"  # where zeroshot.templates came from (config, the release, the default)


class Task(nn.Module):
    name = "task"
    predictions_file = "predictions.json"

    def __init__(self, cfg: FinetuneConfig, backbone, context: TaskContext):
        super().__init__()
        self.cfg, self.backbone, self.tokenizer = cfg, backbone, context.tokenizer
        # The task's own random stream (reference choice, modality dropout, sampling), one per rank; its state is
        # part of every checkpoint.
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    # ---- what trains ----
    def backbone_parts(self) -> list[str]:
        """Backbone towers (image, text, audio, fusion) the task's loss uses; the rest is frozen (and DDP does
        not wait for their gradients)."""
        return []

    def freeze_unused(self) -> None:
        used = set(self.backbone_parts()) - set(self.cfg.freeze)
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        for part in used:
            for param in self.backbone_part_parameters(part):
                param.requires_grad_(True)

    def backbone_part_parameters(self, part: str) -> list[nn.Parameter]:
        if part == "fusion":
            return list(self.backbone.fusion.parameters())
        if part == "temperature":
            return [p for p in (self.backbone.logit_scale, self.backbone.logit_bias) if p is not None]
        return self.backbone.tower_parameters(part)

    def before_training(self) -> None:
        """Called once the task is built and its trainable parts chosen, before any step (or evaluation)."""

    def after_training(self) -> str | None:
        """Called after the last training step; a task that changes its weights here (WiSE-FT) returns the name
        under which the results card reports the evaluation of the changed model."""
        return None

    def may_skip_parameters(self) -> bool:
        """Whether a training step can leave a trainable parameter out of its loss (a tower skipped when no sample
        of the rank's batch has its modality, a pair no rank has, token outputs read without the projection). DDP
        then searches the autograd graph for such parameters every step (``find_unused_parameters``): without it a
        skipped one makes the next step fail (DDP's "Expected to have finished reduction"); with it and none
        skipped, each step pays a graph traversal and torch warns on every rank. True unless the task knows better."""
        return True

    def head_parameters(self) -> list[nn.Parameter]:
        """New parameters (heads, decoders): they get optim.head_lr."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    # ---- the contract ----
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        raise NotImplementedError

    def predictions(self, records: list[dict[str, Any]]) -> Any:
        return [{k: v for k, v in r.items() if not isinstance(v, torch.Tensor)} for r in records]

    def card(self) -> dict[str, Any]:
        """Settings worth a line in the results card (templates, decoding, vocabulary size, ...)."""
        return {}

    def chance(self) -> dict[str, float]:
        """Chance level of the headline metrics, for the demo table."""
        return {}

    def details(self, records: list[dict[str, Any]], run_dir: Path) -> list[str]:
        """Markdown sections for the results card beyond the metrics table (per-class tables, pictures written
        into ``run_dir`` and linked by name); rank 0 only, after evaluation."""
        return []


def rows(batch: dict[str, Any], modality: str) -> torch.Tensor:
    """Indices of the batch samples that have ``modality``."""
    return batch[f"has_{modality}"].nonzero().squeeze(1)


def tokens_of(encoded_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The end-of-text position's features (CLIP's pooling) from ``[B, T, W]`` token features."""
    return encoded_tokens[torch.arange(text.shape[0], device=text.device), text.argmax(dim=-1)]

"""Distributed evaluation: each rank predicts its share, the records are gathered and de-duplicated by sample key,
and the metrics are computed once from the whole set, so they do not depend on the number of ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def gather_records(records: list[dict[str, Any]], rank: int, world: int) -> list[dict[str, Any]]:
    """Every rank's records on every rank, one per key (the first seen), sorted by key."""
    parts = [records]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, records)
    unique: dict[str, dict[str, Any]] = {}
    for part in parts:
        for record in part:
            unique.setdefault(record["key"], record)
    return [unique[key] for key in sorted(unique)]


@torch.no_grad()
def evaluate(task, data, rank: int, world: int, max_samples: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, records) of ``task`` on ``data`` (a TaskData of the eval split)."""
    was_training = task.training
    task.eval()
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    for batch in data:
        if batch["__key__"]:
            records += task.predict(batch)
        errors += batch.get("__errors__", [])
        if max_samples and len(records) * world >= max_samples:
            break
    gathered = gather_records(records, rank, world)
    if max_samples:
        gathered = gathered[:max_samples]
    skipped = [errors]
    if world > 1:
        skipped = [None] * world
        dist.all_gather_object(skipped, errors)
    metrics = task.score(gathered) if gathered else {}
    metrics["skipped_samples"] = float(sum(len(e) for e in skipped))
    task.train(was_training)
    return metrics, gathered

"""What every fine-tuning / evaluation run leaves in its folder: ``metrics.json``, the predictions in the task's
standard format, and ``RESULTS.md``, a results card that says what was measured on what."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mmfuse.redact import redact
from mmfuse.plots import learning_curves


def write_outputs(run_dir: Path, cfg, task, checkpoint, results: dict[str, Any], records: list, step: int) -> None:
    predictions = task.predictions(records)
    (run_dir / task.predictions_file).write_text(_dump(predictions, task.predictions_file))
    summary = {
        "task": cfg.task, "step": step, "checkpoint": {"path": redact(checkpoint.path), "kind": checkpoint.kind,
                                                       "sha256": checkpoint.sha256, "flavor": checkpoint.flavor},
        "data": {"train": redact(cfg.data.train), "eval": redact(cfg.data.eval)},
        "settings": task.card(), "chance": task.chance(), **results,
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    sections = task.details(records, run_dir)
    curves = learning_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"{cfg.task}: {run_dir.name}") \
        if step > 0 and (run_dir / "metrics.jsonl").exists() else None
    if curves is not None:
        sections = ["## Learning curves", "", "![learning curves](curves.png)", "", *sections]
    (run_dir / "RESULTS.md").write_text(results_card(summary, task.predictions_file) + "\n".join(["", *sections]))


def _dump(predictions: Any, name: str) -> str:
    if name.endswith(".jsonl"):
        return "".join(json.dumps(p) + "\n" for p in predictions)
    return json.dumps(predictions, indent=1)


def results_card(summary: dict[str, Any], predictions_file: str) -> str:
    ck, metrics = summary["checkpoint"], summary["metrics"]
    lines = [
        f"# {summary['task']}: results card", "",
        f"- Checkpoint: `{ck['path']}` ({ck['kind']}, flavor `{ck['flavor']}`), sha256 `{ck['sha256']}`",
        f"- Training data: `{summary['data']['train'] or '(none: evaluation only)'}`, {summary['step']} steps",
        f"- Evaluation data: `{summary['data']['eval']}`, {int(metrics.get('samples', 0))} samples"
        f" ({int(metrics.get('skipped_samples', 0))} skipped as undecodable)",
        f"- Predictions: `{predictions_file}`",
        f"- Written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        "## Settings", "",
    ]
    for key, value in summary["settings"].items():
        lines.append(f"- {key}: {json.dumps(value) if isinstance(value, (list, dict)) else value}")
    columns = [("metrics", "this run")] + [(k, k) for k in ("baseline", "wise_ft") if k in summary]
    lines += ["", "## Metrics", "", "| metric | " + " | ".join(title for _, title in columns) + " | chance |",
              "|---|" + "---:|" * (len(columns) + 1)]
    for name in metrics:
        if name in ("samples", "skipped_samples"):
            continue
        cells = [_fmt(summary[key].get(name)) for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(summary['chance'].get(name))} |")
    if "retention/before" in summary:
        before, after = summary["retention/before"], summary.get("retention/after", {})
        lines += ["", "## Zero-shot retention", "", "| metric | before | after | change |", "|---|---:|---:|---:|"]
        for name in before:
            change = after.get(name, float("nan")) - before[name]
            lines.append(f"| {name} | {_fmt(before[name])} | {_fmt(after.get(name))} | {change:+.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2f}"

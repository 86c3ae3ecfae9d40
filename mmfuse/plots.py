"""Pictures a person reads before any table: learning curves from ``metrics.jsonl`` (one run, or several
overlaid for ``mmfuse report``) and confusion matrices.

Matplotlib with the Agg backend (no display), imported only when a picture is drawn: every stage writes its
PNGs into its run folder and links them from its results card.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

# Panels of the learning-curve figure: (title, keys a metric's name starts with, log y axis).
PANELS = (
    ("losses per objective", ("loss/", "loss"), True),
    ("held-out evaluation", ("eval/",), False),
    ("learning rate", ("lr",), False),
)
SKIPPED_EVAL = ("eval/samples", "eval/skipped_samples", "eval/zeroshot/chance_top1")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn last line (a killed run) is left out."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def curves(rows: Iterable[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` of every finite numeric metric, the last value kept where a step repeats."""
    by_name: dict[str, dict[int, float]] = {}
    for row in rows:
        step = row.get("step")
        for name, value in row.items():
            if name == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            by_name.setdefault(name, {})[int(step)] = float(value)
    return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in by_name.items()}


def _panel_keys(series: dict, prefixes: tuple[str, ...]) -> list[str]:
    keys = []
    for name in sorted(series):
        if name in SKIPPED_EVAL:
            continue
        if any(name == p or (p.endswith("/") and name.startswith(p)) for p in prefixes):
            keys.append(name)
    return keys


def eval_keys(series: dict) -> list[str]:
    """The evaluation metrics worth a line: top-1 and R@1 style headline figures, else every eval metric."""
    keys = _panel_keys(series, ("eval/",))
    headline = [k for k in keys if k.endswith(("top1", "R@1", "accuracy", "CIDEr", "BLEU-4", "mean_recall"))
                and "/without_" not in k]
    return headline or keys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    _pyplot().close(fig)
    return out


def learning_curves(metrics_file: Path, out: Path, title: str = "") -> Path | None:
    """Write ``out`` (PNG): losses per objective (log scale), held-out metrics and the learning rate over steps.
    Returns None when the file has no metric to draw."""
    series = curves(read_metrics(metrics_file))
    panels = []
    for name, prefixes, log_y in PANELS:
        keys = eval_keys(series) if prefixes == ("eval/",) else _panel_keys(series, prefixes)
        if keys:
            panels.append((name, keys, log_y))
    if not panels:
        return None
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, keys, log_y) in zip(axes[0], panels):
        for key in keys:
            steps, values = series[key]
            label = key.removeprefix("loss/").removeprefix("eval/") if key != "loss" else "total"
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=label,
                    linewidth=2.2 if key == "loss" else 1.2)
        if log_y and all(v > 0 for key in keys for v in series[key][1]):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def compare_curves(series_by_run: dict[str, dict[str, tuple[list[int], list[float]]]], keys: list[str], out: Path,
                   title: str = "", chance: dict[str, dict[str, float]] | None = None) -> Path | None:
    """Write ``out`` (PNG): one panel per metric in ``keys`` (losses on a log scale), one line per run in one colour
    in every panel, so runs read side by side. ``series_by_run`` maps a run's label to its :func:`curves`;
    ``chance`` (label → {metric: value}) adds a dotted line per run at chance. Returns None when nothing is drawn."""
    keys = [key for key in keys if any(key in series for series in series_by_run.values())]
    if not keys:
        return None
    plt = _pyplot()

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        drawn = []
        for number, (label, series) in enumerate(series_by_run.items()):
            if key not in series:
                continue
            steps, values = series[key]
            colour = f"C{number % 10}"
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, linewidth=1.4, label=label,
                    color=colour)
            drawn += values
            if key in (chance or {}).get(label, {}):
                ax.axhline(chance[label][key], color=colour, linestyle=":", linewidth=1.0, label=f"{label}: chance")
        if key.startswith("loss") and drawn and all(v > 0 for v in drawn):
            ax.set_yscale("log")
        ax.set_title(key if key != "loss" else "loss (total)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def confusion_matrix(labels: list[int], predictions: list[int], classnames: list[str], out: Path,
                     title: str = "") -> Path:
    """Write ``out`` (PNG): row-normalised confusion matrix (true class per row), class names on both axes."""
    plt = _pyplot()
    import numpy as np

    n = len(classnames)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.28 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classnames, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return _save(fig, out)


def score_histogram(scores: list[float], kept: list[bool], title: str) -> bytes:
    """PNG bytes: a histogram of ``scores``, kept and dropped samples stacked in two colours (curation's similarity
    filter, where the cut falls)."""
    import io

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    kept_scores = [s for s, k in zip(scores, kept) if k]
    dropped = [s for s, k in zip(scores, kept) if not k]
    ax.hist([kept_scores, dropped], bins=40, stacked=True, label=[f"kept ({len(kept_scores)})", f"dropped ({len(dropped)})"],
            color=["tab:blue", "tab:gray"])
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()

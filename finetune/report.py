"""``python -m finetune.report RUN...``: one table of the headline metrics of fine-tuning / evaluation runs, next to
the untrained baseline (heads at initialisation) and chance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = {
    "zeroshot": ("top1", "top5"),
    "retrieval": ("mean_recall", "image_to_text/R@1", "text_to_image/R@1", "audio_to_text/R@1", "text_to_audio/R@1",
                  "unique_text/image_to_text/R@1", "unique_text/text_to_image/R@1"),
    "caption": ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"),
    "vqa": ("accuracy", "without_image/accuracy", "prior/accuracy", "changed_without_image"),
    "classify": ("accuracy", "without_image/accuracy", "without_text/accuracy", "without_audio/accuracy"),
}


def rows(run_dir: Path) -> list[tuple[str, str, float | None, float, float | None]]:
    summary = json.loads((run_dir / "metrics.json").read_text())
    settings = summary.get("settings", {})
    label = run_dir.name
    if summary["task"] == "classify" and settings.get("fusion") not in label:
        label += f" ({settings.get('fusion')})"
    out = []
    for metric in HEADLINE[summary["task"]]:
        if metric in summary["metrics"]:
            out.append((label, metric, summary.get("baseline", {}).get(metric), summary["metrics"][metric],
                        summary.get("chance", {}).get(metric)))
    if "retention/before" in summary:  # zero-shot classification before (untrained column) and after fine-tuning
        before, after = summary["retention/before"], summary.get("retention/after", {})
        if "top1" in before and "top1" in after:
            out.append((label, "zero-shot retention top1", before["top1"], after["top1"], None))
    return out


def format_table(run_dirs: list[Path]) -> str:
    cell = lambda v: f"{v:>10.2f}" if v is not None else f"{'-':>10}"
    table = [row for run_dir in run_dirs for row in rows(run_dir)]
    width = max([len(r[0]) for r in table] + [3]) + 2
    metric_width = max([len(r[1]) for r in table] + [24]) + 2
    lines = [f"{'run':<{width}}{'metric':<{metric_width}}{'untrained':>10}{'result':>10}{'chance':>10}"]
    for label, metric, baseline, value, chance in table:
        lines.append(f"{label:<{width}}{metric:<{metric_width}}{cell(baseline)}{cell(value)}{cell(chance)}")
    lines.append("(percentages, except caption metrics on pycocoevalcap's 0-1 scale (CIDEr 0-10); untrained = new "
                 "heads at their initialisation; '-' = not applicable)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m finetune.report RUN_DIR...", file=sys.stderr)
        return 2
    print(format_table([Path(a) for a in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pretrain.report RUN``: the last in-loop evaluation of a run as a table, next to chance; the run's
learning curves (``curves.png``) and results card (``RESULTS.md``) are (re)written beside its metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def evaluations(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise ValueError(f"{run_dir} has no evaluation in metrics.jsonl (set data.eval)")
    return evals


def last_eval(run_dir: Path) -> dict[str, float]:
    return evaluations(run_dir)[-1]


def untrained_eval(run_dir: Path) -> dict[str, float] | None:
    """The evaluation of the untrained model (step 0, ``run.eval_untrained``), if the run made one."""
    first = evaluations(run_dir)[0]
    return first if first["step"] == 0 else None


def format_report(metrics: dict[str, float], untrained: dict[str, float] | None = None) -> str:
    """The evaluation as tables, each figure beside chance and, where given, the untrained model's."""
    samples = metrics.get("eval/samples", 0)
    before = untrained or {}
    head = f"{'untrained %':>13}" if untrained else ""

    def was(key: str) -> str:
        return f"{before[key]:>13.1f}" if key in before else (f"{'-':>13}" if untrained else "")

    lines = [f"evaluation at step {metrics['step']} on {samples:.0f} held-out samples", ""]
    chance = metrics.get("eval/zeroshot/chance_top1")
    if chance is not None:
        lines.append(f"{'zero-shot classification':<28}{'top-1 %':>9}{head}{'chance %':>10}")
        for modality in ("image", "audio"):
            key = f"eval/zeroshot/{modality}/top1"
            if key in metrics:
                lines.append(f"  {modality:<26}{metrics[key]:>9.1f}{was(key)}{chance:>10.1f}")
        lines.append("")
    retrieval = sorted(k for k in metrics if k.startswith("eval/retrieval/") and k.endswith("R@1"))
    if retrieval:
        lines.append(f"{'retrieval':<28}{'R@1 %':>9}{'R@10 %':>9}{head}{'chance R@1 %':>14}")
        for key in retrieval:
            pair = key.split("/")[2].replace("_to_", " → ")
            lines.append(f"  {pair:<26}{metrics[key]:>9.1f}{metrics[key[:-1] + '10']:>9.1f}{was(key)}"
                         f"{100 / max(samples, 1):>14.2f}")
    return "\n".join(lines)


def write_card(run_dir: Path) -> Path:
    """``curves.png`` (losses per objective, held-out metrics, learning rate over steps) and ``RESULTS.md`` (the
    last evaluation next to chance, linking the curves) in ``run_dir``."""
    from mmfuse.plots import learning_curves, read_metrics

    curves = learning_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"pre-training: {run_dir.name}")
    trained = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    lines = [f"# pre-training: {run_dir.name}", ""]
    if trained:
        last = trained[-1]
        lines += [f"- Steps: {last['step']}, samples seen: {last.get('samples_seen', 0):.0f}",
                  "- Final losses: " + ", ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in sorted(last.items())
                                                 if k.startswith("loss/")), ""]
    if curves is not None:
        lines += ["![learning curves](curves.png)", ""]
    try:
        lines += ["```", format_report(last_eval(run_dir), untrained_eval(run_dir)), "```", ""]
    except ValueError as err:
        lines += [str(err), ""]
    card = run_dir / "RESULTS.md"
    card.write_text("\n".join(lines))
    return card


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pretrain.report RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    write_card(run_dir)
    print(format_report(last_eval(run_dir), untrained_eval(run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

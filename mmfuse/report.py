"""``mmfuse report RUN [RUN ...] output.path=DIR``: one page comparing runs side by side.

``DIR/REPORT.md`` holds the config keys whose values differ between the runs, the final metrics of every run in one
table, and links ``DIR/curves.png``: each loss and each headline evaluation metric in a panel of its own, one line
per run. Pre-training and fine-tuning run folders both work, mixed or not; one run gets its curves and table alone.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.config import MISSING, ConfigError, parse_args
from mmfuse.redact import redact_text, redact_values

# Samples seen, as pre-training and fine-tuning log them.
SAMPLES = ("samples_seen", "train/samples")


class _Absent:
    """The value of a config key a run does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


@dataclass
class ReportOutput:
    path: str = MISSING
    """Folder that REPORT.md and curves.png are written to (created if missing)."""


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)
    """Run folders to compare (mmfuse pretrain or mmfuse finetune / eval), given as bare arguments."""
    output: ReportOutput = field(default_factory=ReportOutput)

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("no run folder given: mmfuse report RUN [RUN ...] output.path=DIR")


@dataclass
class Run:
    """What the report reads from one run folder."""

    path: Path
    label: str
    kind: str
    """``pre-training``, ``fine-tuning (TASK)`` or ``evaluation (TASK)``."""
    config: dict[str, Any]
    """config.yaml flattened to dotted keys, URLs redacted."""
    rows: list[dict]
    """metrics.jsonl's rows (or metrics.json's final metrics as one row)."""
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{"chance" | "untrained": {eval/metric: value}}``, where the run recorded them."""


def load_run(path: Path, label: str = "") -> Run:
    """A run folder's config and metrics; a ConfigError naming ``path`` when it is not a run folder or has no
    metric."""
    import yaml

    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path}: not a run folder (no config.yaml)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path / 'config.yaml'}: not readable as YAML ({' '.join(str(err).split()[:8])})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path / 'config.yaml'}: not a config (a YAML mapping)")
    summary = _summary(path)
    rows = _metric_rows(path, summary)
    if not rows:
        raise ConfigError(f"{path}: no metrics (metrics.jsonl and metrics.json missing or without a numeric value)")
    task = summary.get("task") or config.get("task")
    trained = max(row["step"] for row in rows) > 0
    kind = "pre-training" if not task else f"fine-tuning ({task})" if trained else f"evaluation ({task})"
    flat = current_names(flatten(redact_values(config)), SCHEMAS["finetune" if task else "pretrain"])
    return Run(path, label or path.name, kind, flat, rows, _baselines(rows, summary))


# The config schemas of the runs a report reads, named rather than imported (mmfuse sits below the stages).
SCHEMAS = {"pretrain": "pretrain.config:PretrainConfig", "finetune": "finetune.config:FinetuneConfig"}


def current_names(flat: dict[str, Any], schema: str) -> dict[str, Any]:
    """A run's flattened config with keys renamed since it was written under their current names (the schema's
    ``RENAMED``), so an old run and a new one compare like with like instead of differing in every renamed key."""
    import importlib

    from omegaconf import OmegaConf

    from mmfuse.config import renamed_keys

    module, _, name = schema.partition(":")
    renames = renamed_keys(OmegaConf.structured(getattr(importlib.import_module(module), name)))
    out: dict[str, Any] = {}
    for key, value in flat.items():
        old = next((old for old in renames if key == old or key.startswith(old + ".")), None)
        out[renames[old] + key[len(old):] if old else key] = value
    return out


def _baselines(rows: list[dict], summary: dict) -> dict[str, dict[str, float]]:
    """Chance and the untrained model, as eval/ metrics: a fine-tuning run's from metrics.json (``chance``,
    ``baseline`` with run.baseline=true), pre-training's zero-shot chance from its logged eval/zeroshot/chance_top1
    (its untrained model is the step-0 point of its curves)."""
    out = {}
    for name, key in (("chance", "chance"), ("untrained", "baseline")):
        values = summary.get(key)
        if isinstance(values, dict):
            out[name] = {f"eval/{metric}": value for metric, value in values.items() if _is_number(value)}
    chance = [row["eval/zeroshot/chance_top1"] for row in rows if _is_number(row.get("eval/zeroshot/chance_top1"))]
    if chance:
        top1 = {key for row in rows for key in row if key.startswith("eval/zeroshot/") and key.endswith("/top1")}
        out.setdefault("chance", {}).update({key: chance[-1] for key in top1})
    return {name: values for name, values in out.items() if values}


def _summary(path: Path) -> dict:
    """metrics.json, which fine-tuning and evaluation runs write at their end ({} when absent or unreadable)."""
    try:
        summary = json.loads((path / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _metric_rows(path: Path, summary: dict) -> list[dict]:
    from mmfuse.plots import read_metrics

    rows = []
    if (path / "metrics.jsonl").is_file():
        rows = [row for row in read_metrics(path / "metrics.jsonl") if isinstance(row, dict)
                and isinstance(row.get("step"), int) and any(_is_number(v) for k, v in row.items() if k != "step")]
    if not rows and isinstance(summary.get("metrics"), dict):  # a fine-tuning run's final metrics only
        final = {f"eval/{name}": value for name, value in summary["metrics"].items() if _is_number(value)}
        if final:
            rows = [{"step": int(summary.get("step", 0)), **final}]
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists and empty mappings are values of their own."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """``{dotted key: [value per run]}`` of the keys whose values are not the same in every run (a key one run
    lacks counts as differing; its value is ``ABSENT``)."""
    keys = sorted({key for run in runs for key in run.config})
    table = {key: [run.config.get(key, ABSENT) for run in runs] for key in keys}
    return {key: values for key, values in table.items() if any(not _same(v, values[0]) for v in values[1:])}


def _same(a: Any, b: Any) -> bool:
    if a is ABSENT or b is ABSENT:
        return a is b
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def final_metrics(run: Run) -> dict[str, float]:
    """The last logged value of every loss and ``eval/*`` metric (a NaN included: a run that diverged shows it),
    each metric followed by its baselines, after ``steps``, the samples seen (pre-training's ``samples_seen``;
    fine-tuning logs ``train/samples``, counted since the run last started) and the step of the last evaluation."""
    last: dict[str, float] = {}
    for row in run.rows:
        for key, value in row.items():
            if _is_number(value) and (key in ("loss", *SAMPLES) or key.startswith(("loss/", "eval/"))):
                last[key] = value
    out: dict[str, float] = {"steps": max(row["step"] for row in run.rows)}
    out.update({key: last[key] for key in SAMPLES if key in last})
    eval_steps = [row["step"] for row in run.rows if any(k.startswith("eval/") for k in row)]
    if eval_steps:
        out["last eval at step"] = eval_steps[-1]
    losses = sorted(k for k in last if k == "loss" or k.startswith("loss/"))
    out.update({k: last[k] for k in losses})
    for key in sorted(k for k in last if k.startswith("eval/")):
        out[key] = last[key]
        out.update({f"{key} ({name})": values[key] for name, values in run.baselines.items() if key in values})
    return out


def _number(value: Any) -> str:
    if not _is_number(value):
        return "-"
    if not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def _cell(value: Any) -> str:
    """A config value as a Markdown table cell: one line, pipes escaped."""
    if value is ABSENT:
        return repr(ABSENT)
    text = value if isinstance(value, str) and value else json.dumps(value, default=str)  # "" shows as ""
    return "`" + text.replace("\n", " ").replace("|", "\\|") + "`"


def labels_for(paths: list[Path]) -> list[str]:
    """Each run's folder name, or the path as given where two runs share a name."""
    names = [path.name or str(path) for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def format_report(runs: list[Run], curves: Path | None) -> str:
    """REPORT.md: the runs, their config differences, the curves and the final metrics. Config values were redacted
    when read; the paths are redacted here."""
    lines = [f"# Comparing {len(runs)} run{'s' if len(runs) != 1 else ''}", ""]
    lines += [f"- `{run.label}`: {run.kind}, `{redact_text(str(run.path))}`" for run in runs] + [""]
    columns = " | ".join(f"`{run.label}`".replace("|", "\\|") for run in runs)
    lines += ["## Config differences", ""]
    if len(runs) == 1:
        lines += ["One run: nothing to compare.", ""]
    else:
        differences = config_differences(runs)
        if differences:
            lines += [f"| key | {columns} |", "|---|" + "---|" * len(runs)]
            lines += [f"| `{key}` | " + " | ".join(map(_cell, values)) + " |" for key, values in differences.items()]
        else:
            lines.append("The configs are the same.")
        lines.append("")
    lines += ["## Curves", ""]
    lines += ["![curves](curves.png)" if curves is not None else "No metric to draw.", ""]
    lines += ["## Final metrics", "", "The last logged value of each metric; `(chance)` and `(untrained)` rows are the "
              "baselines the run recorded.", ""]
    finals = [final_metrics(run) for run in runs]
    names = sorted({name for final in finals for name in final}, key=_row_order)
    lines += [f"| metric | {columns} |", "|---|" + "---:|" * len(runs)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_number(final.get(name)) for final in finals) + " |")
    if any("train/samples" in final for final in finals):
        lines += ["", "`train/samples` (fine-tuning): the samples trained on since the run last started; a resumed run "
                      "counts only its last leg."]
    return "\n".join(lines) + "\n"


def _row_order(name: str) -> tuple:
    """steps, samples, last eval step; then losses; then eval metrics, each followed by its baselines."""
    head = ("steps", *SAMPLES, "last eval at step")
    if name in head:
        return (0, head.index(name))
    return (1 if name.startswith("loss") else 2, name)


def plotted_keys(series_by_run: dict[str, dict]) -> list[str]:
    """Every loss, then the headline evaluation metrics (top-1, R@1, accuracy, CIDEr ...) of any of the runs."""
    from mmfuse.plots import eval_keys

    merged = {key: None for series in series_by_run.values() for key in series}
    losses = sorted(key for key in merged if key == "loss" or key.startswith("loss/"))
    return losses + eval_keys(merged)


def run(cfg: ReportConfig) -> Path:
    """Write ``REPORT.md`` and ``curves.png`` into ``cfg.output.path``; returns the report's path."""
    from mmfuse.plots import compare_curves, curves

    paths = [Path(p) for p in cfg.runs]
    runs = [load_run(path, label) for path, label in zip(paths, labels_for(paths))]
    out = Path(cfg.output.path)
    out.mkdir(parents=True, exist_ok=True)
    series_by_run = {r.label: curves(r.rows) for r in runs}
    chance = {r.label: r.baselines.get("chance", {}) for r in runs}
    picture = compare_curves(series_by_run, plotted_keys(series_by_run), out / "curves.png", chance=chance,
                             title=" vs ".join(r.label for r in runs) if len(runs) <= 4 else f"{len(runs)} runs")
    report = out / "REPORT.md"
    report.write_text(format_report(runs, picture))
    return report


def split_runs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Bare arguments (the run folders) apart from ``--config FILE``, flags and ``key=value``."""
    runs, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--config":  # its file is the next argument, not a run
            rest.append(arg)
            file = next(args, None)
            if file is not None:
                rest.append(file)
        elif arg.startswith("-") or "=" in arg:
            rest.append(arg)
        else:
            runs.append(arg)
    return runs, rest


def main(argv: list[str] | None = None) -> int:
    runs, rest = split_runs(list(sys.argv[1:] if argv is None else argv))
    # JSON is YAML: the run paths reach the loader as one list, quoted whatever characters they hold.
    overrides = [f"runs={json.dumps(runs)}"] if runs else []
    cfg = parse_args(ReportConfig, rest + overrides, prog="mmfuse report", description=__doc__.split("\n\n")[0],
                     positional="run [run ...]")
    print(run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

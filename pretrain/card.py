"""The model card of a release (``README.md``): what the model is, what it was trained on and how, how well it did
against its baselines, and how to load it.

``mmfuse export`` knows the run folder (``read_run``); a release saved without one (``save_release(state, cfg,
path, {})``) gets the card that its weights and ``config.json`` alone support, with the rest marked as not
recorded. Every string that comes from a config or a path is redacted: a card never carries credentials.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmfuse.redact import redact, redact_text

if TYPE_CHECKING:
    from pretrain.config import PretrainConfig

NOT_RECORDED = "not recorded"
WITHOUT_RUN = "not recorded (this release was saved without its run folder)"
OBJECTIVES = ("contrastive", "masked_image", "masked_audio", "masked_text", "cross_modal_masked")
# PARTS of pretrain.model.multimodal, grouped as the card shows them.
PART_GROUPS = {"image tower": ("image",), "text tower": ("text",), "audio tower": ("audio",),
               "fusion encoder": ("fusion",),
               "heads and decoders": ("temperature", "image_decoder", "audio_decoder", "text_mask_embedding",
                                      "text_mlm_head", "mlm_head", "fused_patch_decoder")}


@dataclass
class ReleaseInfo:
    """What a release says about itself beyond its run: the model card's license and description."""

    license: str = "unspecified"
    """License of the released weights (an SPDX identifier such as apache-2.0, or a sentence)."""
    data_license: str = "unspecified"
    """License or terms of use of the training data."""
    description: str = "unspecified"
    """A sentence or two at the top of the model card: what the model is and what it is for."""


@dataclass
class RunRecord:
    """What a run folder says about how an exported checkpoint was made."""

    folder: str
    """The run folder, as the export command named it."""
    config: PretrainConfig
    """The run's config.yaml."""
    step: int
    """The exported checkpoint's step."""
    world_size: int | None
    zero_stage: int
    metrics: list[dict]
    """metrics.jsonl rows up to the checkpoint's step."""
    trained_parts: set[str]
    """Model parts (``PARTS``) some enabled objective read, minus the locked towers: the rest kept their weights."""
    command: str
    """The command that exported the checkpoint."""


def read_run(run_dir: Path, cfg: PretrainConfig, step: int, world_size: int | None, zero_stage: int,
             command: str) -> RunRecord:
    from pretrain.objectives import build_objectives

    path = run_dir / "metrics.jsonl"
    from mmfuse.plots import read_metrics

    rows = [r for r in read_metrics(path) if isinstance(r, dict)] if path.is_file() else []  # a torn last line is left out
    read = set().union(*(objective.parts for objective in build_objectives(cfg.objectives)))
    locked = set(cfg.model.freeze)
    return RunRecord(str(run_dir), cfg, step, world_size, zero_stage, [r for r in rows if r.get("step", 0) <= step],
                     read - locked, command)


def model_card(release: dict, parameters: dict[str, int], output: str, run: RunRecord | None = None,
               info: ReleaseInfo | None = None) -> str:
    """The card, as Markdown. ``release``: the release's config.json; ``parameters``: parameter count per model part
    (``PARTS``); ``output``: where the release is written."""
    info = info or ReleaseInfo()
    model = release["model"]
    where = redact(output)
    title = f"{Path(run.folder).name}, step {run.step}" if run else Path(where.rstrip("/")).name or "release"
    lines = [f"# {redact_text(title)}: mmfuse model (flavor `{model['flavor']}`)", ""]
    if info.description != "unspecified":
        lines += [redact_text(info.description), ""]
    lines += [f"An image, text and audio model from mmfuse: {sum(parameters.values()) / 1e6:.2f} M "
              f"parameters, a {model['embed_dim']}-d shared embedding space ({model['contrastive']} temperature).", "",
              "| | |", "|---|---|",
              f"| Flavor | `{model['flavor']}` |",
              f"| License | {redact_text(info.license)} |",
              f"| Training data license | {redact_text(info.data_license)} |",
              f"| Source | {_source(release.get('source', {}))} |", ""]
    lines += _model_section(model, parameters, run)
    lines += _data_section(run, info)
    lines += _training_section(run)
    lines += _evaluation_section(run, where)
    lines += _loading_section(model, where)
    lines += _preprocessing_section(release)
    return "\n".join(lines).rstrip() + "\n"


def _source(source: dict) -> str:
    shown = [f"{key} `{redact_text(str(value))}`" for key, value in source.items() if value not in (None, "")]
    return ", ".join(shown) or NOT_RECORDED


def _model_section(model: dict, parameters: dict[str, int], run: RunRecord | None) -> list[str]:
    image, text, audio, fusion = model["image"], model["text"], model["audio"], model["fusion"]
    size = lambda tower: f"{_plural(tower['layers'], 'layer')} x {tower['width']} wide"
    shapes = {
        "image tower": f"ViT, {size(image)}, {image['patch_size']} px patches on {image['image_size']} px images, "
                       f"{image['stem']} stem",
        "text tower": f"transformer, {size(text)}, {text['context_length']} tokens",
        "audio tower": f"ViT over log-mels, {size(audio)}, {audio['n_mels']} mels x {audio['frames']} frames, "
                       f"{audio['patch_size']} px patches",
        "fusion encoder": f"{size(fusion)} (text attends to image and audio)",
        "heads and decoders": "temperature, MAE decoders, vocabulary heads (used by the pre-training objectives)",
    }
    head = "| part | parameters | architecture |" + (" trained in this run |" if run else "")
    lines = ["## Model", "", head, "|---|---:|---|" + ("---|" if run else "")]
    for group, parts in PART_GROUPS.items():
        count = sum(parameters.get(part, 0) for part in parts)
        row = f"| {group} | {_count(count)} | {shapes[group]} |"
        if run:
            built = [part for part in parts if parameters.get(part, 0)]
            trained = [part for part in built if part in run.trained_parts]
            row += f" {'yes' if trained == built else ', '.join(trained) or 'no'} |"
        lines.append(row)
    lines += [f"| total | {_count(sum(parameters.values()))} | |" + (" |" if run else ""), ""]
    if run and run.config.model.init_open_clip:
        lines += [f"The image and text towers started from `{redact(run.config.model.init_open_clip)}`.", ""]
    if run and any(parameters.get(part, 0) and part not in run.trained_parts for part in parameters):
        lines += ["Parts no enabled objective read (or locked with `model.freeze`) kept the weights they started "
                  "with.", ""]
    return lines


def _data_section(run: RunRecord | None, info: ReleaseInfo) -> list[str]:
    lines = ["## Training data", ""]
    if run is None:
        return lines + [f"- Data: {WITHOUT_RUN}", f"- License: {redact_text(info.data_license)}", ""]
    data = run.config.data
    names = [name.strip() for name in data.train.split("::") if name.strip()]
    shards = _shards(names)
    counted = _plural(len(names), "dataset") + (f", {_plural(shards, 'shard')}" if shards else "")
    lines += [f"- Training data ({counted}): " + ", ".join(f"`{redact_text(name)}`" for name in names)]
    if data.weights:
        lines.append("- Mixing weights: " + ", ".join(f"{w:g}" for w in data.weights))
    seen = _last(run.metrics, "samples_seen")
    if seen is None:
        lines.append(f"- Samples seen: {NOT_RECORDED}")
    else:  # the last logged line may come before the checkpoint's step (run.log_every)
        by = f" (by step {seen['step']}, the last one logged)" if seen["step"] != run.step else ""
        lines.append(f"- Samples seen: {seen['samples_seen']:,.0f}{by}")
    lines.append(f"- Held-out evaluation data: {f'`{redact_text(data.eval)}`' if data.eval else 'none'}")
    lines += [f"- License: {redact_text(info.data_license)}", ""]
    return lines


def _training_section(run: RunRecord | None) -> list[str]:
    lines = ["## Training", ""]
    if run is None:
        return lines + [f"Steps, compute and objectives: {WITHOUT_RUN}.", ""]
    cfg = run.config
    on_gpu = any("gpu_allocated_gb" in row for row in run.metrics)
    hardware = "GPU" if on_gpu else "CPU"
    ranks = run.world_size or cfg.launch.nproc or None  # the checkpoint's world size; else what the config asked
    steps = f"- Steps: {run.step:,} (of `run.steps={cfg.run.steps}`)"
    if ranks:
        per_step = cfg.data.batch_size * ranks * cfg.engine.grad_accum
        steps += (f", global batch {per_step:,} samples ({cfg.data.batch_size} per process x "
                  f"{_plural(ranks, 'process', 'es')} x {_plural(cfg.engine.grad_accum, 'micro-batch', 'es')} per step)")
    precision = cfg.engine.precision
    if precision == "auto":
        precision = "auto: bf16 or fp16 on this GPU run" if on_gpu else "auto: fp32 on this CPU run"
    seconds = _training_seconds(run.metrics)
    optim = cfg.optim
    lines += [steps,
              "- Training time: " + (f"{_duration(seconds)} (the logged steps' durations; start-up not included)"
                                     if seconds else NOT_RECORDED),
              "- Devices: " + (f"{_plural(ranks, 'process', 'es')} ({hardware})" if ranks else NOT_RECORDED),
              f"- DeepSpeed ZeRO stage {run.zero_stage}, precision {precision}",
              f"- Optimizer: AdamW, lr {optim.lr:g} ({_plural(optim.warmup_steps, 'warmup step')}, then {optim.schedule}), "
              f"weight decay {optim.weight_decay:g}, seed {cfg.seed}", "",
              "| objective | weight | settings |", "|---|---:|---|"]
    objectives = cfg.objectives
    for name in OBJECTIVES:
        sub = getattr(objectives, name)
        if sub.weight > 0:
            lines.append(f"| `{name}` | {sub.weight:g} | {_objective_settings(name, sub, cfg.model.contrastive)} |")
    lines.append("")
    off = [name for name in OBJECTIVES if getattr(objectives, name).weight <= 0]
    if off:
        lines += [f"Off (weight 0): {', '.join(f'`{name}`' for name in off)}.", ""]
    return lines


def _objective_settings(name: str, sub, contrastive: str) -> str:
    if name == "contrastive":
        pairs = ", ".join(f"{pair} {weight:g}" for pair, weight in sub.pairs.items() if weight > 0)
        flip = f"; FLIP (masked forward, ratio {sub.mask_ratio:g})" if sub.use_masked_forward else ""
        return f"{contrastive}; pairs {pairs}{flip}"
    if name in ("masked_image", "masked_audio"):
        return f"mask ratio {sub.mask_ratio:g}" + (", normalised targets" if sub.norm_targets else "")
    patches = ", image patches too" if getattr(sub, "patches", False) else ""
    return f"mask probability {sub.mask_prob:g}{patches}"


def _evaluation_section(run: RunRecord | None, where: str) -> list[str]:
    lines = ["## Evaluation", ""]
    if run is None:
        lines += [f"In-loop evaluation: {WITHOUT_RUN}.", ""]
    else:
        evals = [row for row in run.metrics if any(key.startswith("eval/") for key in row)]
        untrained = evals[0] if evals and evals[0]["step"] == 0 else None
        trained = [row for row in evals if row["step"] > 0]
        if trained:
            lines += _results(trained[-1], untrained, redact_text(run.config.data.eval))
        elif untrained:
            lines += ["Only the untrained model (step 0) was evaluated before this checkpoint.", ""]
        else:
            why = "none logged" if run.config.data.eval else "data.eval was not set"
            lines += [f"No in-loop evaluation before this checkpoint ({why}).", ""]
    eval_data = _quoted(redact_text(run.config.data.eval) if run and run.config.data.eval else "EVAL_DATA")
    name = Path(run.folder).name if run else Path(where.rstrip("/")).name or "release"
    release = f"checkpoint={_quoted(where)}"
    lines += ["Commands:", "", "```bash"]
    if run:
        lines += [f"# the figures above: the run's own evaluation (its config: {run.folder}/config.yaml), printed by",
                  f"python -m pretrain.report {_quoted(run.folder)}", "# this release, from the run's checkpoint",
                  redact_text(run.command)]
    lines += ["# evaluate the release without training (zero-shot classification, retrieval)",
              *(f"mmfuse eval --config configs/finetune/{task}.yaml {release} data.eval={eval_data} "
                f"run.dir=runs/{name}-{task}" for task in ("zeroshot", "retrieval")),
              "# fine-tune it on a task (one config per task in configs/finetune/)",
              f"mmfuse finetune --config configs/finetune/retrieval.yaml {release} data.train=TRAIN_DATA "
              f"data.eval={eval_data} run.dir=runs/{name}-retrieval-ft", "```", ""]
    return lines


def _results(metrics: dict, untrained: dict | None, eval_data: str) -> list[str]:
    samples = metrics.get("eval/samples", 0)
    before = untrained or {}
    was = (lambda key: f" {_pct(before.get(key))} |") if untrained else (lambda key: "")
    extra = " untrained {} |" if untrained else ""
    rule = "|---|---:|---:|" + ("---:|" if untrained else "") + "---:|"
    lines = [f"In-loop evaluation at step {metrics['step']} on {samples:.0f} held-out samples (`{eval_data}`), "
             "in %" + (", beside the untrained model's (step 0)" if untrained else "") + " and chance.", ""]
    chance = metrics.get("eval/zeroshot/chance_top1")
    zeroshot = [m for m in ("image", "audio") if f"eval/zeroshot/{m}/top1" in metrics]
    if zeroshot and chance is not None:
        lines += [f"| zero-shot classification | top-1 | top-5 |{extra.format('top-1')} chance top-1 |", rule]
        for modality in zeroshot:
            key = f"eval/zeroshot/{modality}/top1"
            lines.append(f"| {modality} | {_pct(metrics[key])} | {_pct(metrics.get(key[:-1] + '5'))} |{was(key)} "
                         f"{_pct(chance)} |")
        lines.append("")
    retrieval = [key for key in metrics if key.startswith("eval/retrieval/") and key.endswith("/R@1")]
    if retrieval:
        lines += [f"| retrieval | R@1 | R@10 |{extra.format('R@1')} chance R@1 |", rule]
        for key in retrieval:
            pair = key.split("/")[2].replace("_to_", " → ")
            lines.append(f"| {pair} | {_pct(metrics[key])} | {_pct(metrics.get(key[:-1] + '10'))} |{was(key)} "
                         f"{100 / max(samples, 1):.2f} |")
        lines.append("")
    return lines


def _loading_section(model: dict, where: str) -> list[str]:
    lines = ["## Loading", "", "### open_clip", ""]
    if model["image"]["stem"] == "patch":
        local = where if "://" not in where else "PATH/TO/A/LOCAL/COPY"  # open_clip's local-dir: reads local folders
        copy = "; open_clip reads local folders, so copy the release first" if local != where else ""
        lines += ["The image and text towers, in open_clip's own format (`open_clip_model.safetensors`, "
                  f"`open_clip_config.json`){copy}:", "", "```python", "import open_clip", "",
                  f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{local}")',
                  f'tokenizer = open_clip.get_tokenizer("local-dir:{local}")', "```", ""]
    else:
        lines += ["open_clip cannot load this model: its image tower has a convolutional stem "
                  "(`model.image.stem=conv`), which open_clip cannot build, so the release has no open_clip files. "
                  "Load it with mmfuse.", ""]
    lines += ["### mmfuse", "", "```bash",
              f"mmfuse finetune --config configs/finetune/zeroshot.yaml checkpoint={_quoted(where)} "
              f"flavor={model['flavor']} ...", "```", "",
              "```python", "from pretrain.release import load_release", "",
              f'model, release = load_release("{where}")  # MultimodalModel with every weight; config.json as a dict',
              "```", ""]
    return lines


def _preprocessing_section(release: dict) -> list[str]:
    pre = release["preprocess"]
    audio = pre["audio"]  # a release being saved records its whole front end (pretrain/release.py)
    f_max = f"{audio['f_max']:g} Hz" if audio["f_max"] else "sample_rate / 2"
    templates = release.get("zeroshot", {}).get("templates", [])
    lines = ["## Preprocessing (config.json)", "",
             f"- Images: {pre['image_size']} px, {pre['interpolation']}, mean {_floats(pre['mean'])}, "
             f"std {_floats(pre['std'])}",
             f"- Text: {pre['tokenizer']}, {pre['context_length']} tokens",
             f"- Audio front end (`preprocess.audio`; fine-tuning enforces it): {audio['sample_rate']} Hz, "
             f"n_fft {audio['n_fft']}, hop {audio['hop_length']}, {audio['n_mels']} mels from {audio['f_min']:g} Hz to "
             f"{f_max}, {audio['frames']} frames per window",
             "- Zero-shot templates (`zeroshot.templates`; zero-shot fine-tuning uses them by default): "
             + (", ".join(f"`{redact_text(t)}`" for t in templates) if templates else NOT_RECORDED), ""]
    return lines


def _last(rows: list[dict], key: str) -> dict | None:
    found = [row for row in rows if key in row]
    return found[-1] if found else None


def _training_seconds(rows: list[dict]) -> float:
    """The training loop's time from its logged throughput: each line's samples over its samples/s."""
    seconds, seen = 0.0, 0
    for row in rows:
        if "samples_seen" not in row:
            continue
        if row.get("samples_per_s", 0) > 0:
            seconds += (row["samples_seen"] - seen) / row["samples_per_s"]
        seen = row["samples_seen"]
    return seconds


def _shards(names: list[str]) -> int | None:
    """Shards in the training datasets where that is known without the network: brace patterns and .tar files
    name them; local folders list them (sizes.json). None where any dataset's count is unknown."""
    import braceexpand

    from data_pipeline.loader.sources import shard_listing

    total = 0
    for name in names:
        if name.endswith(".tar") or "{" in name:
            total += len(list(braceexpand.braceexpand(name)))
        elif "://" not in name:
            try:
                total += len(shard_listing(name))
            except (OSError, ValueError):
                return None
        else:
            return None
    return total


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n:,} {word}{'' if n == 1 else suffix}"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _quoted(text: str) -> str:
    return shlex.quote(text)

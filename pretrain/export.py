"""``mmfuse export RUN [output.path=RELEASE_DIR_OR_URL] [step=N] [release.license=...]``: consolidate a ZeRO
checkpoint (any stage, any number of ranks) into a release folder in one process, with its model card."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmfuse.config import MISSING, parse_args
from mmfuse.logs import setup_logging
from mmfuse.redact import redact
from pretrain.card import ReleaseInfo
from pretrain.config import PretrainConfig, model_audio
from mmfuse.commits import MARKER, committed_tags, tag_for, tag_step

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class ExportOutput:
    path: str = ""
    """Release folder or object-store URL (default: RUN/release/step_NNNNNN)."""


@dataclass
class ExportConfig:
    run: str = MISSING
    """The run folder written by mmfuse pretrain."""
    step: int = -1
    """Checkpoint step to export (-1: as ``select`` says)."""
    select: str = "auto"
    """Without a step: ``best`` (the checkpoint run.keep_best picked), ``latest`` (the newest committed one), or
    ``auto`` (the best when the run kept one, else the newest)."""
    output: ExportOutput = field(default_factory=ExportOutput)
    release: ReleaseInfo = field(default_factory=ReleaseInfo)
    """License and description for the model card (README.md) and config.json; never credentials."""


def consolidated_state(checkpoint_root: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained model from a (sharded) DeepSpeed checkpoint."""
    from pretrain.engine import consolidated_module_state

    state = consolidated_module_state(checkpoint_root, tag, zero_stage)
    # The engine wrapped the model in PretrainStep (attribute ``model``).
    return {name.removeprefix("model."): tensor.float() for name, tensor in state.items() if name.startswith("model.")}


def export(cfg: ExportConfig) -> str:
    run = Path(cfg.run)
    root = run / "checkpoints"
    tags = committed_tags(root)
    if not tags:
        raise ValueError(f"{run} has no committed checkpoint to export")
    tag, selected = pick_checkpoint(cfg, root, tags)
    from mmfuse.config import load_config

    # The mel shape always came from the model; a config.yaml from before that was enforced may hold the loader's
    # unused defaults there, so it is read as "follow the model".
    train_cfg = load_config(PretrainConfig, [str(run / "config.yaml")], ["data.audio.n_mels=0", "data.audio.frames=0"])
    from pretrain.card import read_run
    from pretrain.checkpoint import saved_zero_stage
    from pretrain.release import save_release

    # The stage the checkpoint was written with, whatever config.yaml says now (a later resume may have rewritten it).
    zero_stage = saved_zero_stage(root / tag)
    state = consolidated_state(root, tag, zero_stage)
    output = cfg.output.path or str(run / "release" / tag)
    marker = json.loads((root / tag / MARKER).read_text())
    record = read_run(run, train_cfg, tag_step(tag), marker.get("world_size"), zero_stage, export_command(cfg, tag, output))
    source = {"run": str(run.resolve()), "checkpoint": tag, "selected_by": selected,
              "code_version": marker.get("code_version")}
    save_release(state, train_cfg.model, output, source,
                 templates=list(train_cfg.eval.templates), audio=model_audio(train_cfg.data.audio, train_cfg.model),
                 run=record, info=cfg.release)
    log.info("exported %s to %s", tag, output)
    return output


def pick_checkpoint(cfg: ExportConfig, root: Path, tags: list[str]) -> tuple[str, str]:
    """(tag, how it was chosen) for export: step=N, else the best by run.keep_best or the newest (``select``)."""
    from pretrain.checkpoint import read_best

    if cfg.select not in ("auto", "best", "latest"):
        raise ValueError(f"select must be auto, best or latest, got {cfg.select!r}")
    if cfg.step >= 0:
        tag = tag_for(cfg.step)
        if not (root / tag / MARKER).is_file():
            raise ValueError(f"step {cfg.step} has no committed checkpoint in {root.parent} (have: {', '.join(tags)})")
        return tag, f"step={cfg.step}"
    best = read_best(root) if cfg.select != "latest" else None
    if best is None and cfg.select == "best":
        raise ValueError(f"{root.parent} has no best checkpoint (train with run.keep_best=METRIC and data.eval); "
                         f"select=latest exports the newest ({tags[-1]})")
    if best is None:
        return tags[-1], "latest"
    metric = best["metric"].removeprefix("eval/")
    return best["tag"], (f"run.keep_best: {metric} = {best['value']:.4g}, the best of "
                         f"{best['evaluations']} in-loop evaluations")


def export_command(cfg: ExportConfig, tag: str, output: str) -> str:
    """The command that makes this release again (the step pinned, the release fields that were set)."""
    words = ["mmfuse", "export", cfg.run, f"step={tag_step(tag)}", f"output.path={redact(output)}"]
    words += [f"release.{name}={value}" for name, value in vars(cfg.release).items() if value != "unspecified"]
    return " ".join(shlex.quote(word) for word in words)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = parse_args(ExportConfig, argv, prog="mmfuse export", description=__doc__.strip(), positional="run")
    print(export(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

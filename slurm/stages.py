"""The stages ``mmfuse submit`` can launch: a small explicit registry (adding a stage is adding an entry).

Each entry names the stage's config schema (its module's ``PRESETS`` apply) and its ``run(cfg)``, where its run
folder is, and, for stages that checkpoint on SIGTERM/SIGUSR1 (pretrain), how to tell that the work is finished.
No stage imports ``slurm``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    schema: str
    """``module:Class`` of the stage's root config dataclass."""
    runner: str
    """Module exposing ``run(cfg)``."""
    run_dir: Callable[[Any], str]
    """The stage's run folder for a resolved config (the launcher's files go in ``<run_dir>/slurm``)."""
    finished: Callable[[Any], bool] | None = None
    """For stages that checkpoint when signalled: True once the work is done (so a late signal does not requeue)."""
    check: Callable[[Any, Any], None] | None = None
    """``check(cfg, slurm_cfg)`` at submission: combinations that cannot work under the launcher (ConfigError),
    and paths made absolute (the tasks start in the submission directory, but the run folder is printed)."""
    array: str = ""
    """Split over a job array (``slurm.array_size``) instead of one multi-task job: the module exposing
    ``plan(cfg, parts, create_output) -> (callables, summary)`` (one callable per array task) and ``finish(cfg) ->
    message`` (when no task is left to run)."""
    preflight: str = ""
    """Module exposing ``preflight(cfg)``: the stage's own checks of its inputs and outputs (paths, credentials,
    modalities), run on the login node before anything is submitted."""

    def load_schema(self) -> type:
        module, _, name = self.schema.partition(":")
        return getattr(importlib.import_module(module), name)

    def run(self, cfg: Any) -> Any:
        return importlib.import_module(self.runner).run(cfg)

    def check_inputs(self, cfg: Any) -> None:
        if self.preflight:
            importlib.import_module(self.preflight).preflight(cfg)


def _pretrain_check(cfg, slurm) -> None:
    from mmfuse.schema import ConfigError

    if "://" not in cfg.run.dir:
        cfg.run.dir = str(Path(cfg.run.dir).absolute())
    if cfg.run.resume != "auto" and slurm.max_requeue:
        raise ConfigError(f"run.resume={cfg.run.resume!r} with slurm.max_requeue={slurm.max_requeue}: a requeued job must "
                          "resume from its own checkpoints (run.resume=auto), or set slurm.max_requeue=0")


def _pretrain_finished(cfg) -> bool:
    from mmfuse.commits import committed_tags

    tags = committed_tags(Path(cfg.run.dir) / "checkpoints")
    return bool(tags) and int(tags[-1].removeprefix("step_")) >= cfg.run.steps


def _output_run_dir(stage: str) -> Callable[[Any], str]:
    """``runs/<stage>/<last part of output.path>``: the launcher's files of a stage that writes a dataset (which
    may be an object-store URL) stay out of it."""
    def run_dir(cfg) -> str:
        name = cfg.output.path.rstrip("/").rsplit("/", 1)[-1] or "dataset"
        return str(Path("runs") / stage / name)

    return run_dir


STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain.config:PretrainConfig", "pretrain.run", lambda cfg: cfg.run.dir, _pretrain_finished,
                      check=_pretrain_check, preflight="pretrain.run"),
    "shard": Stage("data_pipeline.config:ShardConfig", "data_pipeline.shard.stage", _output_run_dir("shard"),
                   array="slurm.shard_array", preflight="data_pipeline.shard.stage"),
    # Array tasks with curate.processes scan workers each; a rerun scans only the shards it has no scan of.
    "curate": Stage("data_pipeline.curate.config:CurateConfig", "data_pipeline.curate.stage", _output_run_dir("curate"),
                    array="slurm.curate_array", preflight="data_pipeline.curate.stage"),
}

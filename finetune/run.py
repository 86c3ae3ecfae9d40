"""``mmfuse finetune --config configs/finetune/<task>.yaml checkpoint=RELEASE data.train=... data.eval=... run.dir=RUN``
(``mmfuse eval``: the same config, evaluation only)."""

from __future__ import annotations

import os
import sys

from mmfuse.config import parse_args
from mmfuse.logs import setup_logging
from finetune.config import FinetuneConfig
from finetune.tasks import TASKS

_TASKS = ", ".join(TASKS)
# What every rank imports, loaded once by the launcher that forks them (mmfuse.launch.spawn_local). DeepSpeed is
# left to the ranks that use it (engine.zero_stage).
WARM = ("finetune.trainer", "pretrain.model.multimodal", "accelerate")
DESCRIPTION = {
    "finetune": f"Fine-tune a released checkpoint on one task ({_TASKS}) and evaluate it.",
    "eval": f"Evaluate a released checkpoint on one task ({_TASKS}) without training.",
}


def run(cfg: FinetuneConfig, train: bool = True) -> dict:
    from pretrain.engine import name_the_accelerator

    name_the_accelerator()
    from finetune.trainer import Finetuner

    return Finetuner(cfg, train=train).run()


def preflight(cfg: FinetuneConfig, stage: str = "finetune") -> None:
    """Everything that can be checked without the model, in the launching process before any rank starts: the
    checkpoint, every data split and the media files it names, the run folder, the checkpoint to resume."""
    from data_pipeline.preflight import check_input, check_output
    from finetune.checkpoint import check_checkpoint, resolve_resume
    from finetune.records import check_data
    from mmfuse.tracking import require_wandb

    require_wandb(cfg.log)
    check_input("checkpoint", cfg.checkpoint)
    check_checkpoint(cfg)
    check_output("run.dir", cfg.run.dir)
    check_data(cfg, train=stage == "finetune" and cfg.trains)
    if stage == "finetune":
        resolve_resume(cfg)


def main(argv: list[str] | None = None, stage: str = "finetune") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(FinetuneConfig, argv, prog=f"mmfuse {stage}", description=DESCRIPTION[stage])
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    preflight(cfg, stage)
    if cfg.launch.nproc > 0 and "WORLD_SIZE" not in os.environ:
        from mmfuse.launch import spawn_local

        module = f"finetune.{'run' if stage == 'finetune' else 'eval'}"
        return spawn_local(module, argv, cfg.launch.nproc, cfg.launch.master_port, stage, warm=WARM)
    run(cfg, train=stage == "finetune")
    return 0


if __name__ == "__main__":
    from mmfuse.launch import rank_entry

    sys.exit(rank_entry("finetune", main))

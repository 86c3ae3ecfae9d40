"""``mmfuse pretrain --config configs/pretrain/tiny.yaml data.train=DATASET run.dir=RUN [launch.nproc=2]``."""

from __future__ import annotations

import os
import sys

from mmfuse.config import parse_args
from mmfuse.logs import setup_logging
from pretrain.config import PRESETS, PretrainConfig

# What every rank imports, loaded once by the launcher that forks them (mmfuse.launch.spawn_local); the last one is
# DeepSpeed's Muon module, which ZeRO-1/2 import on their first gradient reduction (it compiles, loading inductor).
WARM = ("pretrain.trainer", "pretrain.model.multimodal", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer")


def run(cfg: PretrainConfig) -> dict:
    import torch.distributed as dist

    from pretrain.engine import name_the_accelerator

    name_the_accelerator()
    from pretrain.trainer import Trainer

    last = Trainer(cfg).run()
    if dist.is_initialized():  # NCCL warns at exit (and may hang) when the group is left to the interpreter
        dist.destroy_process_group()
    return last


def preflight(cfg: PretrainConfig) -> None:
    """Everything the config alone cannot tell, checked in the launching process before any rank, process group or
    SLURM job starts: datasets and checkpoints to read, folders to write, credentials, the objectives' modalities."""
    from data_pipeline.preflight import (PreflightError, check_dataset, check_input, check_output, dataset_modalities,
                                         size_mismatch)
    from mmfuse.config import ConfigError
    from mmfuse.launch import says_warnings
    from mmfuse.tracking import require_wandb
    from pretrain.objectives.config import missing_modalities, read_modalities
    from mmfuse.commits import check_resume_path

    require_wandb(cfg.log)
    if cfg.engine.precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("engine.precision=fp16 needs a GPU (dynamic loss scaling); on CPU use fp32 (auto) or bf16")
    try:
        check_resume_path(cfg.run.resume)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_output("run.dir", cfg.run.dir)
    if cfg.run.checkpoint_sync:
        check_output("run.checkpoint_sync", cfg.run.checkpoint_sync)
    if cfg.model.init_open_clip:
        check_input("model.init_open_clip", cfg.model.init_open_clip)
    check_dataset("data.train", cfg.data.train)
    if cfg.data.keep:  # a missing subset index, or one made for other shards, fails here rather than in a rank
        from data_pipeline.loader.sources import resolve_sources

        resolve_sources(cfg.data.train, keep=cfg.data.keep)
    if cfg.data.eval:
        check_dataset("data.eval", cfg.data.eval)
    if "image" in read_modalities(cfg.objectives) and says_warnings():
        for line in size_mismatch("data.train", cfg.data.train, cfg.model.image.image_size):
            print(f"mmfuse pretrain: warning: {line}", file=sys.stderr)
    found = dataset_modalities(cfg.data.train, cfg.data.members)
    lacking = missing_modalities(cfg.objectives, found)
    if lacking:
        needs = "; ".join(f"objectives.{name} needs {what}" for name, what in lacking.items())
        raise PreflightError(f"data.train has {', '.join(sorted(found)) or 'no known modality'} only: {needs} (set "
                             "their weight to 0, or add the missing modality to the data)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(PretrainConfig, argv, prog="mmfuse pretrain", description=__doc__.strip(), presets=PRESETS)
    preflight(cfg)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    # Under an external launcher (torchrun, srun, the slurm launcher) this process already is a rank.
    if cfg.launch.nproc > 0 and "WORLD_SIZE" not in os.environ:
        from mmfuse.launch import spawn_local

        return spawn_local("pretrain", argv, cfg.launch.nproc, cfg.launch.master_port, "pretrain", warm=WARM)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mmfuse pretrain --config configs/pretrain/tiny.yaml data.train=DATASET run.dir=RUN [launch.nproc=2]``."""

from __future__ import annotations

import logging
import os
import sys

from mmfuse.config import parse_args
from pretrain.config import PRESETS, PretrainConfig


def run(cfg: PretrainConfig) -> dict:
    import torch.distributed as dist

    from pretrain.trainer import Trainer

    last = Trainer(cfg).run()
    if dist.is_initialized():  # NCCL warns at exit (and may hang) when the group is left to the interpreter
        dist.destroy_process_group()
    return last


def preflight(cfg: PretrainConfig) -> None:
    """What the config alone cannot tell, checked on this machine before any process or process group starts."""
    import torch

    from mmfuse.config import ConfigError
    from pretrain.checkpoint import check_resume_path
    from pretrain.engine import resolved_precision

    if resolved_precision(cfg.engine) == "fp16" and not torch.cuda.is_available():
        raise ConfigError("engine.precision=fp16 needs a GPU (dynamic loss scaling); on CPU use fp32 (auto) or bf16")
    try:
        check_resume_path(cfg.run.resume)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(PretrainConfig, argv, prog="mmfuse pretrain", description=__doc__.strip(), presets=PRESETS)
    preflight(cfg)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    # Under an external launcher (torchrun, srun, the slurm launcher) this process already is a rank.
    if cfg.launch.nproc > 0 and "WORLD_SIZE" not in os.environ:
        from pretrain.launch import spawn_local

        return spawn_local("pretrain", argv, cfg.launch.nproc, cfg.launch.master_port)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

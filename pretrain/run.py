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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(PretrainConfig, argv, prog="mmfuse pretrain", description=__doc__.strip(), presets=PRESETS)
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

"""Run ``open_clip_train.main`` with DistributedDataParallel on CPU (used by bench/train.py, in open_clip's venv).

open_clip's trainer wraps the model as ``DistributedDataParallel(model, device_ids=[device])``; torch refuses
``device_ids`` for a CPU module, so open_clip cannot train with more than one CPU process as released. This wrapper
drops ``device_ids`` for CPU devices (what DDP expects on CPU) and changes nothing else.

    torchrun --nproc_per_node 2 bench/open_clip_cpu_ddp.py --model ... --device cpu ...
"""

import sys

import torch
from open_clip_train import main as open_clip_main

_DDP = torch.nn.parallel.DistributedDataParallel


class _CpuDDP(_DDP):
    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


torch.nn.parallel.DistributedDataParallel = _CpuDDP

if __name__ == "__main__":
    open_clip_main.main(sys.argv[1:])

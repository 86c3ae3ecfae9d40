"""DeepSpeed in one place: the process group, the generated DeepSpeed config, the optimizer and schedule.

Users never write DeepSpeed JSON; ``deepspeed_config`` derives it from the typed config (``engine.extra`` is
merged last as an escape hatch).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from pretrain.config import EngineConfig, OptimConfig, PretrainConfig


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Topology:
    """Join the process group the standard launch variables describe (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
    without them, a group of one. gloo on CPU, NCCL on GPU."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        _init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return Topology(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank,
                    torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def name_the_accelerator() -> None:
    """Tell DeepSpeed it runs on the CPU where there is no CUDA device, before anything imports it: left to
    detect that itself, it warns "Setting accelerator to CPU" in every process of every stage."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (``deepspeed_shm_comm``) when it joins a
    process group: a C++ build into ~/.cache/torch_extensions, minutes on a fresh machine before the first step,
    and concurrent jobs rebuild or wait on each other's copy. Only DeepSpeed's ``inference_all_reduce`` uses the op;
    training's collectives go through torch.distributed (gloo) either way. Marked incompatible, DeepSpeed falls back
    as it does where the op cannot build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _init_process_group(backend: str) -> None:
    """torch's env:// rendezvous, except after a torchrun restart.

    torchrun's default (static) rendezvous keeps one store for the whole job, and its workers use it unprefixed
    (torch >= 2.4 dropped the per-attempt prefix, assuming a new store per attempt). Restarted ranks would then
    read the addresses the killed attempt's ranks published (gloo: "connectFullMesh failed ... Connection
    refused"; NCCL: a stale unique id). Namespacing the keys by attempt, as torch < 2.4 did, gives every attempt
    its own rendezvous. TORCHELASTIC_RESTART_COUNT is the same on every rank of one agent (one node); across
    nodes it is as consistent as the agents' restart counts.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        torch.distributed.init_process_group(backend, init_method="env://")
        return
    from torch.distributed.constants import default_pg_timeout

    agent_store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                             is_master=False, timeout=default_pg_timeout)
    store = torch.distributed.PrefixStore(f"mmfuse/attempt_{attempt}", agent_store)
    torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                         world_size=int(os.environ["WORLD_SIZE"]))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolved_precision(cfg: EngineConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def deepspeed_config(cfg: PretrainConfig, world_size: int, load_universal: bool = False, n_params: int = 0) -> dict:
    engine = cfg.engine
    precision = resolved_precision(engine)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("engine.precision=fp16 needs a GPU; on CPU use fp32 (auto) or bf16")
    # DeepSpeed's default buckets (5e8 elements) are allocated per reduction; a bucket larger than the gradients
    # it holds only costs time (seconds per step for a small model on a CPU), so cap them at the trainable
    # parameter count (frozen parts have no gradient to reduce). ZeRO-3 holds its bucket for good, and a bucket of
    # all the gradients would undo its 1/N saving: there it holds 1/N of them.
    stage = engine.zero_stage  # never from engine.extra (PretrainConfig.validate)
    elements = n_params if stage < 3 else -(-n_params // world_size)
    bucket = -(-int(max(1e6, min(5e8, elements))) // 64) * 64 if n_params else int(5e8)  # 64-aligned, up
    zero: dict = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero["stage3_prefetch_bucket_size"] = bucket
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": cfg.data.batch_size * engine.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # mmfuse logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # With an offload, DeepSpeed insists on its own DeepSpeedCPUAdam (a C++ op built at first use); torch's
        # AdamW runs the same update on the CPU copy of the weights.
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return _deep_merge(config, engine.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norms, biases, embeddings (token, positional, class, mask) and temperatures are not decayed."""
    lowered = name.lower()
    return param.ndim < 2 or any(word in lowered for word in ("embedding", "logit_", "pos_embed", "cls_token", "position", "mask_token"))


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    decay, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rest if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warmup, then cosine to min_lr_ratio (or constant); a multiplier of the peak lr."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(model: torch.nn.Module, cfg: PretrainConfig, world_size: int, load_universal: bool = False):
    """(engine, optimizer, scheduler) from ``deepspeed.initialize``; ``load_universal`` to resume a checkpoint
    written at another world size (converted to a universal checkpoint first)."""
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.run.steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, load_universal, trainable), dist_init_required=False)
    return engine, optimizer, scheduler

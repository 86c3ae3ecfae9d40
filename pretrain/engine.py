"""DeepSpeed in one place: the process group, the generated DeepSpeed config, the optimizer and schedule, the
engine the trainer drives (``Engine``) and the checkpoint conversions (universal, consolidated fp32).

Users never write DeepSpeed JSON; ``deepspeed_config`` derives it from the typed config (``engine.extra`` is
merged last as an escape hatch).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mmfuse.allocator import keep_freed_memory
from pretrain.config import EngineConfig, OptimConfig, PretrainConfig
from pretrain.optim import lr_factor, no_decay


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


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    decay, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (rest if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """The schedule's multiplier of the peak lr as a function of the step (``pretrain.optim.lr_factor``)."""
    return lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)


class Engine:
    """The training step's module under DeepSpeed ZeRO, behind the few calls a training loop makes: forward,
    backward, optimizer step (dropping a non-finite one), the learning rate, checkpoints and parameter gathering.

    ``external`` are parameters the module's forward reads outside their owning submodule's forward (ZeRO-3 must
    gather them for it). ``load_universal`` resumes a checkpoint written at another world size (converted with
    ``to_universal_checkpoint`` first). ``ds_engine`` is DeepSpeed's own engine, for benchmarks that inspect its
    buffers; training code goes through the methods.
    """

    def __init__(self, module: torch.nn.Module, cfg: PretrainConfig, world_size: int, load_universal: bool = False,
                 external: "list[torch.nn.Parameter] | tuple" = ()):
        import deepspeed

        if not torch.cuda.is_available():
            # A CPU step frees and re-allocates tensors of up to the gradient bucket's size (DeepSpeed allocates
            # it anew every step): served from a heap that keeps freed memory, they stop page-faulting in afresh
            # (mmfuse/allocator.py; 2-3x fewer system seconds per step, see bench/RESULTS.md).
            keep_freed_memory(mmap_threshold=1 << 30, trim_threshold=1 << 30)
        # DeepSpeed's ZeRO step calls a deprecated torch collective every step; the warning says nothing to users.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        self.zero_stage = cfg.engine.zero_stage
        if self.zero_stage == 3:
            for param in external:
                deepspeed.zero.register_external_parameter(module, param)
        optimizer = torch.optim.AdamW(param_groups(module, cfg.optim), lr=cfg.optim.lr,
                                      betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.run.steps))
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.ds_engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, world_size, load_universal, trainable), dist_init_required=False)
        precision = resolved_precision(cfg.engine)
        self.loss_scaling = precision == "fp16"  # its scaler overflows now and then by design, dropping that step
        # DeepSpeed's ZeRO, bf16 and fp16 optimizers drop a step whose gradient norm is not finite; its plain fp32
        # path (ZeRO-0) does not, so this class checks that one itself.
        self._guard = self.zero_stage == 0 and precision == "fp32"
        self._guard_norm: torch.Tensor | None = None

    def __call__(self, batch: dict):
        return self.ds_engine(batch)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.ds_engine.get_data_types()[0]

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss)

    def step(self) -> None:
        """After each micro-batch's backward; at the accumulation boundary the optimizer updates, or drops a
        non-finite gradient."""
        if self._guard and self.ds_engine.is_gradient_accumulation_boundary() and self._nonfinite_gradient():
            self._skip_step()
        else:
            self.ds_engine.step()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps dropped so far (non-finite gradients, fp16 scale overflows)."""
        return self.ds_engine.skipped_steps

    def grad_norm(self) -> float | torch.Tensor | None:
        """The global gradient norm of the last optimizer step (None before any is known)."""
        norm = self.ds_engine.get_global_grad_norm()
        return norm if norm is not None else self._guard_norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def follow_schedule(self) -> None:
        """Set the learning rate from the schedule at the current step. A checkpoint holds the rate of the old
        schedule's next step; the schedule is a function of the step and run.steps, so a resume that extends the
        run follows the new one from its first step."""
        scheduler = self.scheduler
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)

    def gathered(self, params: list[torch.nn.Parameter]):
        """A context in which ``params`` are whole on every rank (ZeRO-3 partitions them; others already are)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    def save(self, root: Path, tag: str, client: dict) -> None:
        """Every rank writes its part of ``root/tag`` (DeepSpeed's layout), ``client`` in rank 0's model file."""
        self.ds_engine.save_checkpoint(str(root), tag=tag, client_state=client)

    def load(self, root: Path, tag: str) -> dict:
        """Model, optimizer and scheduler from ``root/tag``; returns the client state saved with them."""
        _, client = self.ds_engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
        return client

    def _nonfinite_gradient(self) -> bool:
        """ZeRO-0 in fp32, at the boundary: after backward's all-reduce every rank holds the same gradient."""
        grads = [p.grad for p in self.ds_engine.module.parameters() if p.grad is not None]
        if not grads:
            return False
        self._guard_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return not bool(torch.isfinite(self._guard_norm))

    def _skip_step(self) -> None:
        """What DeepSpeed's own optimizers do with a non-finite gradient: drop it, leave weights, optimizer state
        and learning-rate schedule as they are, and count the step as taken and skipped."""
        ds = self.ds_engine
        ds.zero_grad()
        ds.micro_steps += 1
        ds.global_steps += 1
        ds.skipped_steps += 1


def checkpoint_zero_stage(folder: Path) -> int:
    """The ZeRO stage of a DeepSpeed checkpoint folder, from its file names (per-rank model states: stage 3;
    per-rank optimizer states: 1-2, read as 2; neither: 0)."""
    if any(folder.glob("zero_pp_rank_*_model_states.pt")):
        return 3
    return 2 if any(folder.glob("*optim_states.pt")) else 0


def to_universal_checkpoint(source: Path, target: Path) -> None:
    """Convert a sharded checkpoint folder into a DeepSpeed universal one (loads at any world size)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(source), "--output_folder", str(target), "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting {source} to a universal checkpoint failed (DeepSpeed's ds_to_universal, "
                           f"exit {done.returncode}):\n{done.stderr[-3000:]}")


def consolidated_module_state(root: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict of the engine's module from a (sharded) checkpoint ``root/tag``."""
    if zero_stage == 0:
        # No partitioning: rank 0's model file holds the module. It is our own run's file (trusted), written by
        # DeepSpeed with pickled client state, so it cannot be read with weights_only.
        return torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag)
    if zero_stage == 1:
        # ZeRO-1's consolidation reads the optimizer's partitions only, which hold no frozen parameter (an
        # image-text run's audio tower). They were never partitioned: rank 0's model file has them whole.
        states = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = {**{k: v for k, v in states["module"].items() if k not in state}, **state}
    return state

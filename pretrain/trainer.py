"""The pre-training loop, read top to bottom as a recipe; setup lives in named methods.

Each rank: join the process group → build model, loader, objectives, DeepSpeed engine → resume if a committed
checkpoint exists → for each step: batch, losses, backward, step; agree across ranks on non-finite losses and stop
signals; log; checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.decode import ZERO_WHEN_ABSENT
from data_pipeline.loader import Loader, build_loader
from mmfuse.allocator import keep_freed_memory
from mmfuse.config import to_dict, to_yaml
from pretrain.checkpoint import CheckpointManager
from pretrain.config import PretrainConfig
from pretrain.engine import Topology, build_engine, init_distributed, zero_stage
from pretrain.flops import peak_tflops, train_flops_per_sample
from pretrain.logger import MetricsLogger
from pretrain.model import MultimodalModel
from pretrain.objectives import DistContext, Forward, build_objectives

log = logging.getLogger("mmfuse.pretrain")


def batch_to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors onto ``device``; floating ones in ``dtype``, the engine's compute dtype (bf16 / fp16 weights take
    inputs of their own dtype; masks, ids and labels keep theirs).

    The cast runs on the device, after the copy: ``.to(cuda, bf16)`` in one call converts on the CPU first, in the
    training process's one thread (~26 ms for a batch of 128 images at 224 px). A modality no sample of the batch
    has is all zeros, so it is made on the device instead of copied (an image-text run carries a 64 MB empty audio
    batch).
    """
    absent = {key for key, flag in ZERO_WHEN_ABSENT.items() if flag in batch and not bool(batch[flag].any())}
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        target = dtype if value.is_floating_point() else value.dtype
        if key in absent:
            out[key] = torch.zeros(value.shape, dtype=target, device=device)
        else:  # the CPU batch (its leased memory) lives in run() until the next one, long after the step's sync
            out[key] = value.to(device, non_blocking=True).to(target)
    return out


class NonFiniteLoss(RuntimeError):
    pass


class PretrainStep(nn.Module):
    """The whole training forward as one module, so DeepSpeed (ZeRO-3 included) sees a single ``forward``."""

    def __init__(self, model: MultimodalModel, objectives: list, ctx: DistContext, weights: dict[str, float],
                 trim_text: bool = False):
        super().__init__()
        self.model, self.objectives, self.ctx, self.weights = model, objectives, ctx, weights
        self.trim_text = trim_text

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        forward = Forward(self.model, batch, self.trim_text)
        losses: dict[str, torch.Tensor] = {}
        for objective in self.objectives:
            for name, value in objective(self.model, batch, forward, self.ctx).items():
                losses[name] = value
        return losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name.split("/")[0]] * value for name, value in losses.items())


class Trainer:
    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.topo: Topology = init_distributed()
        if self.topo.device.type == "cpu":
            # A CPU step frees and re-allocates tensors of up to the gradient bucket's size (DeepSpeed allocates
            # it anew every step): served from a heap that keeps freed memory, they stop page-faulting in afresh
            # (mmfuse/allocator.py; 2-3x fewer system seconds per step, see bench/RESULTS.md).
            keep_freed_memory(mmap_threshold=1 << 30, trim_threshold=1 << 30)
        self.run_dir = Path(cfg.run.dir)
        self.setup_run_folder()
        self.seed_everything(cfg.seed)
        self.model = self.build_model()
        self.loader = self.build_loader()
        self.step_module = self.build_step()
        self.checkpoints = CheckpointManager(self.run_dir, cfg.run.keep, self.topo.rank, self.topo.world_size,
                                             zero_stage(cfg), cfg.run.checkpoint_sync)
        self.resume_from = self.checkpoints.resolve(cfg.run.resume)
        universal = self.resume_from is not None and self.checkpoints.check_resume_layout(self.resume_from)
        if universal:
            self.resume_from = self.checkpoints.to_universal(self.resume_from)
        self.engine, self.optimizer, self.scheduler = build_engine(self.step_module, cfg, self.topo.world_size, universal)
        self.metrics = MetricsLogger(self.run_dir, self.topo.is_main)
        self.flops_per_sample = train_flops_per_sample(cfg.model, cfg.objectives)
        self.peak_flops = self.device_peak_flops()
        self.step, self.samples_seen, self.skipped_steps = 0, 0, 0
        self.stop_requested = False
        self.maybe_resume()
        self.install_signal_handlers()

    # ---- setup ----
    def setup_run_folder(self) -> None:
        if self.topo.is_main:
            for sub in ("checkpoints", "logs", "release"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        dist.barrier()

    def seed_everything(self, seed: int) -> None:
        # DeepSpeed's ZeRO step calls a deprecated torch collective every step; the warning says nothing to users.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        # Same seed on every rank for the model init; masking differs per rank through the rank offset below.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Its debugging aid of filling every torch.empty with NaN costs a write pass over each new buffer
            # (DeepSpeed's gradient bucket included) and changes no result of code that reads what it wrote.
            torch.utils.deterministic.fill_uninitialized_memory = False

    def build_model(self) -> MultimodalModel:
        from pretrain.model.pretrained import load_open_clip_weights

        model = MultimodalModel(self.cfg.model)
        if self.cfg.model.init_open_clip:
            load_open_clip_weights(model.clip, self.cfg.model.init_open_clip)
        for tower in self.cfg.model.lock:
            for param in model.tower_parameters(tower):
                param.requires_grad_(False)
        model.set_grad_checkpointing(self.cfg.engine.gradient_checkpointing)
        if self.cfg.engine.compile:
            model.compile_towers(self.cfg.engine.compile, self.cfg.engine.compile_mode)
            log.info("compiling the blocks of the %s tower(s) on first use", ", ".join(self.cfg.engine.compile))
        torch.manual_seed(self.cfg.seed * 1000 + self.topo.rank + 1)  # per-rank masking/augmentation streams
        return model

    def data_inputs(self, dataset: str, is_train: bool) -> tuple:
        """(loader config for ``dataset``, image transform, tokenizer). Derived values come from the model: the
        loader's audio shape is the audio tower's input, image size and context length are the towers'."""
        import open_clip

        model_cfg, data = self.cfg.model, self.cfg.data
        audio = dataclasses.replace(data.audio, n_mels=model_cfg.audio.n_mels, frames=model_cfg.audio.frames)
        transform = open_clip.image_transform(model_cfg.image.image_size, is_train=is_train)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg.text.context_length)
        return dataclasses.replace(data, train=dataset, audio=audio), transform, tokenizer

    def build_loader(self) -> Loader:
        loader_cfg, transform, tokenizer = self.data_inputs(self.cfg.data.train, is_train=True)
        return build_loader(loader_cfg, self.topo.rank, self.topo.world_size, transform, tokenizer,
                            self.cfg.model.image.image_size)

    def build_step(self) -> PretrainStep:
        objectives_cfg = self.cfg.objectives
        objectives = build_objectives(objectives_cfg)
        weights = {name: getattr(objectives_cfg, name).weight for name in
                   ("contrastive", "masked_image", "masked_audio", "masked_text", "cross_modal_masked")}
        self.freeze_untrained_parts(objectives)
        step = PretrainStep(self.model, objectives, DistContext(self.topo.rank, self.topo.world_size), weights,
                            self.cfg.engine.trim_text_padding)
        if self.cfg.engine.zero_stage == 3:
            import deepspeed

            for param in self.model.loose_parameters():
                deepspeed.zero.register_external_parameter(step, param)
        return step

    def freeze_untrained_parts(self, objectives: list) -> None:
        """Parts no enabled objective reads (a contrastive-only run's audio tower and heads) stay out of the
        optimizer: no Adam update, no gradient buffers, no weight decay pulling them towards 0."""
        from pretrain.model.multimodal import PARTS

        trained = set().union(*(objective.parts for objective in objectives))
        idle = [part for part in PARTS if part not in trained]
        for part in idle:
            for param in self.model.part_parameters(part):
                param.requires_grad_(False)
        if idle and self.topo.is_main:
            log.info("not read by any enabled objective, so frozen: %s", ", ".join(idle))

    def maybe_resume(self) -> None:
        if self.resume_from is None:
            return
        client = self.checkpoints.load(self.engine, self.resume_from)
        self.step, self.samples_seen = client["step"], client["samples_seen"]
        self.skipped_steps = client.get("skipped_steps", 0)
        if client["loader"] is not None:
            self.loader.load_state_dict(client["loader"])
        else:
            self.loader.epoch = client["ranks"][0]["loader"]["epoch"]

    def device_peak_flops(self) -> float | None:
        if self.cfg.engine.peak_tflops > 0:
            return self.cfg.engine.peak_tflops * 1e12
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(self.topo.device)
        peak = peak_tflops(name)
        if peak is None and self.topo.is_main:
            log.warning("no peak FLOPS known for %r: no mfu metric (set engine.peak_tflops)", name)
        return peak * 1e12 if peak else None

    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            log.warning("rank %d got signal %d: checkpointing at the next step boundary", self.topo.rank, signum)
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    # ---- the loop ----
    def batches(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.loader

    def run(self) -> dict[str, float]:
        cfg = self.cfg.run
        data = self.batches()
        window_start, window_samples, wait_start = time.perf_counter(), 0, self.loader.wait_seconds
        last: dict[str, float] = {}
        while self.step < cfg.steps:
            batch = next(data)
            losses, nonfinite, stop = self.train_step(batch)
            self.step += 1
            batch_size = len(batch["__key__"])
            self.samples_seen += batch_size * self.topo.world_size
            window_samples += batch_size
            if nonfinite:
                self.handle_nonfinite(batch)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                last = self.log_metrics(losses, window_samples, elapsed, self.loader.wait_seconds - wait_start)
                window_start, window_samples, wait_start = time.perf_counter(), 0, self.loader.wait_seconds
            if self.cfg.data.eval and ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps):
                last.update(self.evaluate())
            at_end = self.step == cfg.steps and cfg.save_at_end
            if stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or at_end:
                self.save()
            if stop:
                log.warning("stopping at step %d after a signal (checkpoint committed)", self.step)
                break
        self.metrics.close()
        return last

    def train_step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool, bool]:
        """(losses, non-finite on some rank: skipped, a stop signal reached some rank: stop after this step)."""
        batch = self.to_device(batch)
        losses = self.engine(batch)
        total = self.step_module.total(losses)
        if self.cfg.run.debug_nan_step == self.step + 1:
            total = total * float("nan")  # test hook: the non-finite policy must catch this step
        # One collective per step settles both questions for every rank.
        nonfinite, stop = self.agree(not torch.isfinite(total).item(), self.stop_requested)
        detached = {name: value.detach() for name, value in losses.items()}
        if nonfinite:
            return detached, True, stop
        self.engine.backward(total)
        self.engine.step()
        return {**detached, "loss": total.detach()}, False, stop

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch_to_device(batch, self.topo.device, self.engine.get_data_types()[0])

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag True on every rank if it is True on any rank."""
        value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=self.topo.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return [bool(v) for v in value.tolist()]

    def handle_nonfinite(self, batch: dict[str, Any]) -> None:
        keys = batch["__key__"][:8]
        log.error("non-finite loss at step %d on some rank (rank %d keys %s)", self.step, self.topo.rank, keys)
        self.skipped_steps += 1
        if self.cfg.run.nonfinite == "halt":
            self.save()
            raise NonFiniteLoss(f"non-finite loss at step {self.step}; checkpoint saved, halting (run.nonfinite=halt)")

    def log_metrics(self, losses: dict[str, torch.Tensor], samples: int, seconds: float, waited: float) -> dict[str, float]:
        names = sorted(losses)
        # Each rank's loss is world_size x its share of the global mean: the average over ranks is the global loss.
        values = torch.stack([losses[n].float().reshape(()) for n in names]) if names else torch.zeros(0)
        dist.all_reduce(values)
        values /= self.topo.world_size
        metrics = {f"loss/{n}" if n != "loss" else "loss": float(v) for n, v in zip(names, values)}
        metrics.update({
            "lr": float(self.scheduler.get_last_lr()[0]),
            "samples_per_s": samples * self.topo.world_size / max(seconds, 1e-9),
            "samples_per_s_per_device": samples / max(seconds, 1e-9),
            "tflops_per_device": samples * self.flops_per_sample / max(seconds, 1e-9) / 1e12,
            "data_wait_fraction": min(1.0, waited / max(seconds, 1e-9)),
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "logit_scale": float(self.model.logit_scale.detach().float().exp().mean()) if self.cfg.engine.zero_stage < 3 else float("nan"),
            "rss_gb": _rss_gb(),
        })
        for reason, count in self.loader.metrics().items():
            if reason not in ("samples", "wait_seconds"):
                metrics[f"data_errors/{reason}"] = count
        if self.peak_flops:
            metrics["mfu"] = metrics["tflops_per_device"] * 1e12 / self.peak_flops
        if torch.cuda.is_available():
            metrics["gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.log(self.step, metrics)
        return metrics

    def evaluate(self) -> dict[str, float]:
        from pretrain.evaluate import evaluate

        model_cfg = self.cfg.model
        data, transform, tokenizer = self.data_inputs(self.cfg.data.eval, is_train=False)
        # Under ZeRO-3 the parameters are partitioned: gather them for the evaluation forward passes.
        gathered = contextlib.nullcontext()
        if self.cfg.engine.zero_stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        with gathered:
            metrics = evaluate(self.model, data, self.cfg.eval, self.topo.rank, self.topo.world_size, self.topo.device,
                               transform, tokenizer, model_cfg.image.image_size)
        self.metrics.log(self.step, metrics)
        if self.topo.is_main:
            shown = {k.removeprefix("eval/"): round(v, 1) for k, v in metrics.items() if "R@1" in k or "top1" in k}
            log.info("eval at step %d: %s", self.step, shown)
        return metrics

    def save(self) -> str:
        client = {"samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps, "config": to_dict(self.cfg)}
        return self.checkpoints.save(self.engine, self.step, client, self.loader.state_dict())


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

"""The pre-training loop, read top to bottom as a recipe; setup lives in named methods.

Each rank: join the process group → build model, loader, objectives, engine (pretrain/engine.py) → resume if a committed
checkpoint exists → for each step: batch, losses, backward, step; agree across ranks on non-finite losses and stop
signals; log; checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.loader import Loader, build_loader
from mmfuse.redact import redact, redact_text, redact_values
from mmfuse import code_version
from mmfuse.config import to_dict, to_yaml
from pretrain.checkpoint import CheckpointManager, tag_for
from pretrain.config import PretrainConfig, model_audio
from pretrain.engine import Engine, Topology, init_distributed
from pretrain.flops import peak_tflops, train_flops_per_sample
from mmfuse.tracking import MetricsLogger
from pretrain.model import MultimodalModel
from pretrain.objectives import DistContext, build_objectives, objective_weights
from pretrain.step import NonFiniteLoss, PretrainStep, StepResult, batch_to_device

log = logging.getLogger("mmfuse.pretrain")
# Loader counts that are not samples lost: decoded samples, waiting time, a member skipped from a sample that was
# still used, and shard events (each planned sample a broken shard loses is counted as sample_missing).
NOT_SAMPLE_LOSSES = ("samples", "wait_seconds", "member_too_large", "shard_missing", "shard_unreadable", "shard_truncated",
                     "shard_corrupt", "shard_shorter_than_sizes", "shard_longer_than_sizes")


class Trainer:
    def __init__(self, cfg: PretrainConfig):
        # The objective's head is part of the model (config.yaml records it, so export rebuilds the same model).
        cfg.model.fused_patch_decoder |= cfg.objectives.cross_modal_masked.patches
        # What the loader really computes (config.yaml and checkpoints record it, export puts it in the release).
        cfg.data.audio = model_audio(cfg.data.audio, cfg.model)
        self.cfg = cfg
        self.topo: Topology = init_distributed()
        self.run_dir = Path(cfg.run.dir)
        self.setup_run_folder()
        self.seed_everything(cfg.seed)
        self.model = self.build_model()
        self.loader = self.build_loader()
        self.step_module = self.build_step()
        self.checkpoints = CheckpointManager(self.run_dir, cfg.run.keep, self.topo.rank, self.topo.world_size,
                                             cfg.engine.zero_stage, cfg.run.checkpoint_sync)
        self.resume_from = self.checkpoints.resolve(cfg.run.resume)
        self.resume_root = self.resume_from[0] if self.resume_from is not None else None
        universal = self.resume_from is not None and self.checkpoints.check_resume_layout(self.resume_from)
        if universal:
            self.resume_from = self.checkpoints.to_universal(self.resume_from)
        self.engine = Engine(self.step_module, cfg, self.topo.world_size, universal, self.model.loose_parameters())
        self.metrics = MetricsLogger(self.run_dir, self.topo.is_main, cfg.log, to_dict(cfg))
        self.flops_per_sample = train_flops_per_sample(cfg.model, cfg.objectives)
        self.peak_flops = self.device_peak_flops()
        self.step, self.samples_seen, self.skipped_steps = 0, 0, 0
        self.stop_requested = False
        self.last_save = time.monotonic()
        self.grad_norm: float | torch.Tensor | None = None
        self.maybe_resume()
        self.install_signal_handlers()

    # ---- setup ----
    def setup_run_folder(self) -> None:
        if self.topo.is_main:
            for sub in ("checkpoints", "logs", "release"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(redact_text(to_yaml(self.cfg)))
        dist.barrier()

    def seed_everything(self, seed: int) -> None:
        # Same seed on every rank for the model init; masking differs per rank through the rank offset below.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Its debugging aid of filling every torch.empty with NaN costs a write pass over each new buffer
            # (the engine's gradient bucket included) and changes no result of code that reads what it wrote.
            torch.utils.deterministic.fill_uninitialized_memory = False

    def build_model(self) -> MultimodalModel:
        from pretrain.model.pretrained import load_open_clip_weights

        model = MultimodalModel(self.cfg.model)
        if self.cfg.model.init_open_clip:
            load_open_clip_weights(model.clip, self.cfg.model.init_open_clip)
        for tower in self.cfg.model.freeze:
            for param in model.tower_parameters(tower):
                param.requires_grad_(False)
        model.set_grad_checkpointing(self.cfg.engine.gradient_checkpointing)
        if self.cfg.engine.compile:
            model.compile_towers(self.cfg.engine.compile, self.cfg.engine.compile_mode)
            log.info("compiling the blocks of the %s tower(s) on first use", ", ".join(self.cfg.engine.compile))
        torch.manual_seed(self.cfg.seed * 1000 + self.topo.rank + 1)  # per-rank masking/augmentation streams
        return model

    def data_inputs(self, dataset: str, is_train: bool) -> tuple:
        """(loader config for ``dataset``, image transform, tokenizer). Derived values come from the model: image
        size and context length are the towers' (the audio shape was set from it in ``__init__``). A curated subset
        (``data.keep``) is of the training data: the evaluation reads all of ``data.eval``."""
        import open_clip

        model_cfg, data = self.cfg.model, self.cfg.data
        transform = open_clip.image_transform(model_cfg.image.image_size, is_train=is_train)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg.text.context_length)
        return dataclasses.replace(data, train=dataset, keep=data.keep if is_train else ""), transform, tokenizer

    def build_loader(self) -> Loader:
        """The training loader, decoding only the modalities some objective reads (an image-text run on shards
        with audio decodes no audio)."""
        from pretrain.objectives.config import read_modalities

        loader_cfg, transform, tokenizer = self.data_inputs(self.cfg.data.train, is_train=True)
        read = read_modalities(self.cfg.objectives) | set(loader_cfg.require)
        unread = {modality: "" for modality in ("image", "audio") if modality not in read}
        self.unread_modalities = set(unread)
        if unread:
            loader_cfg = dataclasses.replace(loader_cfg, members=dataclasses.replace(loader_cfg.members, **unread))
        return build_loader(loader_cfg, self.topo.rank, self.topo.world_size, transform, tokenizer,
                            self.cfg.model.image.image_size, train=True)

    def build_step(self) -> PretrainStep:
        objectives_cfg = self.cfg.objectives
        objectives = build_objectives(objectives_cfg)
        weights = objective_weights(objectives_cfg)
        self.freeze_untrained_parts(objectives)
        return PretrainStep(self.model, objectives, DistContext(self.topo.rank, self.topo.world_size), weights,
                            self.cfg.engine.trim_text_padding, objectives_cfg.masked_batch_fraction)

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
            self.metrics.resume_at(-1)  # a rerun with nothing committed: an earlier attempt's records are void
            return
        client = self.checkpoints.load(self.engine, self.resume_from)
        self.step, self.samples_seen = client["step"], client["samples_seen"]
        self.metrics.resume_at(self.step)
        # Only once the older checkpoint has loaded: a refused or failed resume must leave the newer ones as they are.
        self.checkpoints.set_aside_newer(self.step, self.resume_root)
        self.skipped_steps = client.get("skipped_steps", 0)
        self.engine.follow_schedule()  # a resume that extends run.steps follows the new schedule
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
        from tqdm.contrib.logging import logging_redirect_tqdm

        from mmfuse.progress import progress as progress_bar

        cfg = self.cfg.run
        data = self.batches()
        window = _Window(self.loader.wait_seconds)
        last: dict[str, float] = {}
        if self.cfg.data.eval and cfg.eval_untrained and self.step == 0:
            with torch.random.fork_rng(devices=[]):  # the eval loader draws its seed: training's stream stays as it was
                untrained = self.evaluate()
            if cfg.keep_best:
                self.best_metric(untrained)  # a metric name the evaluation lacks fails now, not after training
        progress = progress_bar(cfg.steps, "pretrain", "step", initial=self.step, disable=not self.topo.is_main)
        with logging_redirect_tqdm(), progress:
            while self.step < cfg.steps:
                result = self.train_step(data)
                self.step += 1
                self.samples_seen += result.samples
                window.add(result)
                progress.update()
                if result.skipped:
                    self.handle_nonfinite(result)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    last = self.log_metrics(result.losses, window, self.loader.wait_seconds)
                    progress.set_postfix(loss=f"{last['loss']:.4f}" if "loss" in last else "-", refresh=False)
                    window = _Window(self.loader.wait_seconds)
                if self.samples_seen == 0:
                    self.fail_without_samples()
                # The checkpoint first: an evaluation that fails must not cost the steps it would have saved.
                at_end = self.step == cfg.steps and cfg.save_at_end
                due = bool(self.cfg.data.eval) and not result.stop and (  # a stop signal's grace is for the save
                    (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps)
                saved = result.stop or result.checkpoint_due or at_end or (due and bool(cfg.keep_best)) or (
                    cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                if saved:
                    self.save()
                if due:
                    evaluated = self.evaluate_after_save(saved)
                    last.update(evaluated)
                    if cfg.keep_best:
                        self.checkpoints.consider_best(self.step, *self.best_metric(evaluated))
                if result.stop:
                    log.warning("stopping at step %d after a signal (checkpoint committed)", self.step)
                    break
        self.report_skipped()
        self.metrics.close()
        if self.topo.is_main:
            self.write_card()
        return last

    def fail_without_samples(self) -> None:
        """Every sample of a whole step was skipped on every rank: the data yields nothing to train on (a wrong
        member layout, an image format nobody decodes). Stop now, not after run.steps steps of zero losses."""
        errors = {reason: count for reason, count in self.loader.metrics().items() if reason not in ("samples", "wait_seconds")}
        shown = ", ".join(f"{reason}={count}" for reason, count in sorted(errors.items())) or "no sample read"
        shards = [shard.url for source in self.loader.sources for shard in source.shards][:3]
        raise ValueError(f"data.train yielded no usable sample in step {self.step} on any rank (this rank: {shown}; "
                         f"shards {', '.join(redact(url) for url in shards)}); the warnings above name the sample keys")

    def best_metric(self, metrics: dict[str, float]) -> tuple[str, float]:
        """(name, value) of run.keep_best in an evaluation's metrics; a name the evaluation does not produce is an
        error listing the ones it does (at step 0 when the untrained model is evaluated, so within seconds)."""
        name = self.cfg.run.keep_best
        name = name if name.startswith("eval/") else f"eval/{name}"
        if name not in metrics:
            known = ", ".join(key.removeprefix("eval/") for key in sorted(metrics) if key != "eval/samples")
            raise ValueError(f"run.keep_best={self.cfg.run.keep_best} is not a metric of this run's evaluation; "
                             f"it has: {known or 'none (no modality pair or class label in data.eval)'}")
        return name, metrics[name]

    def evaluate_after_save(self, saved: bool) -> dict[str, float]:
        """In-loop evaluation; a failure is re-raised (the run exits non-zero) after saying what was kept."""
        try:
            return self.evaluate()
        except Exception:
            kept = f"checkpoint {tag_for(self.step)} is committed" if saved else "no checkpoint was due at this step"
            log.error("evaluation at step %d failed (%s); the traceback follows", self.step, kept)
            raise

    def report_skipped(self) -> None:
        """Samples skipped over the run, on every rank (metrics.jsonl counts them by reason as data_errors/*): loud past
        data.warn_skipped_fraction."""
        counts = self.loader.metrics()
        # A sample holding only modalities no objective reads (audio-only in an image-text run) was never usable here.
        ignored = NOT_SAMPLE_LOSSES + (("no_modality",) if self.unread_modalities else ())
        skipped = sum(count for reason, count in counts.items() if reason not in ignored)
        totals = torch.tensor([counts.get("samples", 0), skipped], dtype=torch.long, device=self.topo.device)
        dist.all_reduce(totals)
        used, skipped = totals.tolist()
        fraction = skipped / max(used + skipped, 1)
        if self.topo.is_main and fraction > self.cfg.data.warn_skipped_fraction:
            log.warning("!" * 100)
            log.warning("%.1f%% of the training samples read were skipped (%d of %d), above data.warn_skipped_fraction=%g: "
                        "see data_errors/* in metrics.jsonl for the reasons", 100 * fraction, skipped, used + skipped,
                        self.cfg.data.warn_skipped_fraction)
            log.warning("!" * 100)

    def train_step(self, data: Iterator[dict[str, Any]]) -> StepResult:
        """One optimizer step over ``engine.grad_accum`` micro-batches.

        A micro-batch whose loss is not finite on some rank still goes through backward: its non-finite gradient
        makes the optimizer drop the whole accumulated update at the step (``Engine.step``), the same path that
        catches a non-finite gradient behind a finite loss. Every rank runs the same collectives either way."""
        accum = self.cfg.engine.grad_accum
        result, sums = StepResult({}), {}
        skipped_before = self.engine.skipped_steps
        for micro in range(accum):
            batch = next(data)
            losses = self.engine(self.to_device(batch))
            total = self.debug_nonfinite(self.step_module.total(losses), micro)
            # One collective per micro-batch settles every question for every rank.
            bad, stop, due, samples = self.exchange(not torch.isfinite(total).item(), self.stop_requested,
                                                    self.checkpoint_due(), len(batch["__key__"]))
            if self.topo.rank in bad:
                log.error("non-finite loss at step %d (micro-batch %d) on rank %d, sample keys %s", self.step + 1,
                          micro, self.topo.rank, batch["__key__"][:8])
                total = total * float("nan")  # every gradient it reaches non-finite, even where an inf loss's is not
            result.nonfinite_loss_ranks += [rank for rank in bad if rank not in result.nonfinite_loss_ranks]
            result.stop |= stop
            result.checkpoint_due |= due
            result.samples += samples
            result.local_samples += len(batch["__key__"])
            self.engine.backward(total)
            self.engine.step()
            for name, value in {**losses, "loss": total}.items():
                sums[name] = sums.get(name, 0.0) + value.detach()
        dropped = self.engine.skipped_steps > skipped_before
        result.skipped |= bool(result.nonfinite_loss_ranks) or dropped
        # fp16's loss scaler overflows by design now and then (it probes for the largest scale): the engine drops
        # that step and lowers the scale. Counted as skipped, but not a numerical failure to halt on.
        result.scale_overflow = dropped and self.engine.loss_scaling and not result.nonfinite_loss_ranks
        norm = self.engine.grad_norm()
        self.grad_norm = norm if norm is not None else self.grad_norm
        result.losses = {name: value / accum for name, value in sums.items()}
        return result

    def debug_nonfinite(self, total: torch.Tensor, micro: int) -> torch.Tensor:
        """Test hook (``run.debug_nan_step``): on the last rank, make the first micro-batch's loss NaN, or keep the
        loss and make its gradient NaN."""
        if self.cfg.run.debug_nan_step != self.step + 1 or micro or self.topo.rank != self.topo.world_size - 1:
            return total
        if self.cfg.run.debug_nan_in == "loss":
            return total * float("nan")
        total = total.clone()
        total.register_hook(lambda grad: grad * float("nan"))
        return total

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch_to_device(batch, self.topo.device, self.engine.compute_dtype)

    def checkpoint_due(self) -> bool:
        minutes = self.cfg.run.checkpoint_minutes
        return bool(minutes) and self.topo.is_main and time.monotonic() - self.last_save >= minutes * 60

    def exchange(self, nonfinite: bool, stop: bool, due: bool, samples: int) -> tuple[list[int], bool, bool, int]:
        """(ranks whose loss is not finite, a stop signal on some rank, a checkpoint due on some rank, samples of
        every rank), from one all-reduce."""
        world = self.topo.world_size
        value = torch.zeros(world + 3, dtype=torch.long, device=self.topo.device)
        value[self.topo.rank] = int(nonfinite)
        value[world:] = torch.tensor([int(stop), int(due), samples])
        dist.all_reduce(value)
        counts = value.tolist()
        return [rank for rank in range(world) if counts[rank]], counts[world] > 0, counts[world + 1] > 0, counts[world + 2]

    def handle_nonfinite(self, result: StepResult) -> None:
        self.skipped_steps += 1
        if result.scale_overflow:
            log.info("step %d: fp16 loss scale overflow, update skipped and the scale lowered", self.step)
            return
        what = (f"non-finite loss at step {self.step} on rank(s) {result.nonfinite_loss_ranks}"
                if result.nonfinite_loss_ranks else f"non-finite gradient at step {self.step}")
        if self.cfg.run.nonfinite == "halt":
            self.save()
            raise NonFiniteLoss(f"{what}; checkpoint saved, halting (run.nonfinite=halt)")
        if self.topo.is_main:
            log.error("%s: the update is skipped (%d skipped so far)", what, self.skipped_steps)

    def log_metrics(self, losses: dict[str, torch.Tensor], window: "_Window", wait_now: float) -> dict[str, float]:
        names = sorted(losses)
        # Each rank's loss is world_size x its share of the global mean: the average over ranks is the global loss.
        values = torch.stack([losses[n].float().reshape(()) for n in names]) if names else torch.zeros(0)
        dist.all_reduce(values)
        values /= self.topo.world_size
        seconds = max(time.perf_counter() - window.start, 1e-9)
        metrics = {f"loss/{n}" if n != "loss" else "loss": float(v) for n, v in zip(names, values)}
        metrics.update({
            "lr": self.engine.lr,
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else float("nan"),
            "samples_per_s": window.samples / seconds,
            "samples_per_s_per_device": window.local_samples / seconds,
            "tflops_per_device": window.local_samples * self.flops_per_sample / seconds / 1e12,
            "data_wait_fraction": min(1.0, (wait_now - window.wait_start) / seconds),
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "logit_scale": float(self.model.logit_scale.detach().float().exp().mean()) if self.cfg.engine.zero_stage < 3 else float("nan"),
            **_cpu_memory_gb(),
        })
        for reason, count in self.loader.metrics().items():
            if reason not in ("samples", "wait_seconds"):
                metrics[f"data_errors/{reason}"] = count
        if self.peak_flops:
            metrics["mfu"] = metrics["tflops_per_device"] * 1e12 / self.peak_flops
        if torch.cuda.is_available():
            metrics["gpu_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
            metrics["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30  # since the last line
            torch.cuda.reset_peak_memory_stats()
        self.metrics.log(self.step, metrics)
        return metrics

    def evaluate(self) -> dict[str, float]:
        from pretrain.evaluate import evaluate

        model_cfg = self.cfg.model
        data, transform, tokenizer = self.data_inputs(self.cfg.data.eval, is_train=False)
        with self.engine.gathered(list(self.model.parameters())):  # whole, for the evaluation's forward passes
            metrics = evaluate(self.model, data, self.cfg.eval, self.topo.rank, self.topo.world_size, self.topo.device,
                               transform, tokenizer, model_cfg.image.image_size)
        self.metrics.log(self.step, metrics)
        if self.topo.is_main:
            shown = {k.removeprefix("eval/"): round(v, 1) for k, v in metrics.items() if "R@1" in k or "top1" in k}
            log.info("eval at step %d: %s", self.step, shown)
        return metrics

    def write_card(self) -> None:
        """Learning curves and the results card; a failure to draw them is logged, never fatal to the run."""
        from pretrain.report import write_card

        try:
            log.info("results card: %s", write_card(self.run_dir))
        except Exception as err:  # noqa: BLE001 - pictures must not cost a trained model
            log.warning("could not write the learning curves / results card: %s", err)

    def save(self) -> str:
        client = {"samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps,
                  "config": redact_values(to_dict(self.cfg)),
                  "code_version": code_version()}
        tag = self.checkpoints.save(self.engine, self.step, client, self.loader.state_dict())
        self.last_save = time.monotonic()
        return tag


@dataclasses.dataclass
class _Window:
    """The steps since the last metrics line."""

    wait_start: float
    start: float = dataclasses.field(default_factory=time.perf_counter)
    samples: int = 0
    local_samples: int = 0

    def add(self, result: StepResult) -> None:
        self.samples += result.samples
        self.local_samples += result.local_samples


def _cpu_memory_gb() -> dict[str, float]:
    import resource

    import psutil

    return {"rss_gb": psutil.Process().memory_info().rss / 2**30,
            "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

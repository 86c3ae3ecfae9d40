"""The fine-tuning loop on Accelerate (DDP, or DeepSpeed ZeRO through its plugin), read top to bottom as a recipe.

Each rank: load the checkpoint → build the task (heads on the backbone) and its data → freeze what does not train
→ optimizer with layer-wise lr decay and a separate head lr → resume if a committed checkpoint exists → evaluate
the untrained baseline / zero-shot retention if asked → train (loss, backward, clip, step; signals agreed across
ranks; log; checkpoint) → evaluate → write metrics.json, predictions and the results card.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmfuse.redact import redact, redact_text
from finetune.checkpoint import audio_front_end, load_checkpoint, resolve_resume
from finetune.config import FinetuneConfig
from finetune.data import TaskData
from finetune.evaluation import evaluate
from finetune.results import write_outputs
from finetune.tasks import TaskContext, build_task
from mmfuse.config import to_dict, to_yaml
from mmfuse.commits import commit, prune, tag_for, uncommit
from mmfuse.tracking import MetricsLogger
from pretrain.optim import lr_factor, no_decay

log = logging.getLogger("mmfuse.finetune")
logging.getLogger("accelerate").setLevel(logging.WARNING)  # an INFO line per saved file
_LAYER = re.compile(r"\.(?:resblocks|blocks)\.(\d+)\.")
_EMBEDDINGS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding", "patch_embed",
               "cls_token", "pos_embed")


def layer_scale(name: str, model_cfg, decay: float) -> float:
    """lr multiplier of a backbone parameter: decay ** (layers + 1 - its depth); embeddings are depth 0."""
    if decay == 1.0:
        return 1.0
    towers = (("backbone.clip.visual.", model_cfg.image.layers), ("backbone.audio.", model_cfg.audio.layers),
              ("backbone.clip.", model_cfg.text.layers))
    for prefix, layers in towers:
        if name.startswith(prefix):
            match = _LAYER.search(name)
            if match:
                depth = int(match.group(1)) + 1
            elif any(f".{e}" in name for e in _EMBEDDINGS):
                depth = 0
            else:
                depth = layers + 1
            return decay ** (layers + 1 - depth)
    return 1.0  # fusion encoder, temperatures: the top


def param_groups(task, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups: (lr, weight decay) per parameter, merged by value."""
    heads = {id(p) for p in task.head_parameters()}
    groups: dict[tuple[float, float], list] = {}
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        lr = cfg.optim.head_lr if id(param) in heads else cfg.optim.lr * layer_scale(name, task.backbone.cfg, cfg.optim.layer_decay)
        decay = 0.0 if no_decay(name, param) else cfg.optim.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Pre-training's schedule (pretrain/optim.py) over this run's steps."""
    optim = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, optim.warmup_steps, max(1, cfg.run.steps), optim.schedule, optim.min_lr_ratio))


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, train: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg, self.training = cfg, train and cfg.trains
        plugin = None
        if cfg.engine.zero_stage and self.training:
            from accelerate.utils import DeepSpeedPlugin

            # Accelerate takes the DeepSpeed path only in a distributed environment with this flag; a single process
            # gets the environment of a world of one.
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            if "WORLD_SIZE" not in os.environ:
                from mmfuse.launch import free_port

                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(free_port()))
            if not torch.cuda.is_available():
                from pretrain.engine import skip_shm_comm_build

                skip_shm_comm_build()
            plugin = DeepSpeedPlugin(zero_stage=cfg.engine.zero_stage, gradient_clipping=cfg.optim.grad_clip or 0.0)
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
            # DeepSpeed checks train_batch_size = micro batch x accumulation x world size; Accelerate's default
            # leaves it at the micro batch, which only a world of one satisfies.
            plugin.deepspeed_config["train_batch_size"] = cfg.data.batch_size * int(os.environ["WORLD_SIZE"])
        # Accelerate reads these when it wraps the model: find_unused_parameters is set below, once the task and its
        # frozen towers say whether a step can leave a trainable parameter out.
        self.ddp_options = DistributedDataParallelKwargs()
        mixed = {"fp32": "no"}.get(cfg.engine.precision, cfg.engine.precision)  # Accelerate's names
        self.accelerator = Accelerator(cpu=plugin is None and not torch.cuda.is_available(), mixed_precision=mixed,
                                       deepspeed_plugin=plugin, kwargs_handlers=[self.ddp_options])
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.run_dir = Path(cfg.run.dir)
        set_seed(cfg.seed)
        backbone, self.checkpoint = load_checkpoint(cfg)
        # Prompts phrased like the pre-training captions unless the config names its own (config.yaml records them).
        cfg.zeroshot.templates, templates_source = self.checkpoint.zeroshot_templates(cfg.zeroshot.templates)
        cfg.retention.templates = list(cfg.retention.templates or cfg.zeroshot.templates)
        cfg.data.audio = audio_front_end(cfg.data.audio, self.checkpoint.audio)  # what the model was trained on
        if self.accelerator.is_main_process:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(redact_text(to_yaml(cfg)))
        self.accelerator.wait_for_everyone()
        self.train_data, self.eval_data = self.build_data(backbone)
        self.task = build_task(cfg, backbone, TaskContext(self.tokenizer, self.train_data, self.eval_data,
                                                          templates_source))
        self.task.freeze_unused()
        self.task.before_training()
        self.metrics = MetricsLogger(self.run_dir, self.accelerator.is_main_process, cfg.log, to_dict(cfg))
        self.step, self.stop_requested = 0, False
        self.train_used, self.train_skipped = 0, Counter()
        if self.training:
            self.ddp_options.find_unused_parameters = self.task.may_skip_parameters()
            optimizer = torch.optim.AdamW(param_groups(self.task, cfg), betas=(0.9, 0.98), eps=1e-6)
            self.scheduler = lr_schedule(optimizer, cfg)
            self.model, self.optimizer = self.accelerator.prepare(self.task, optimizer)
            self.accelerator.register_for_checkpointing(self.scheduler)
            self.resume()
        else:
            self.model = self.task.to(self.accelerator.device)
        self.previous_handlers = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    # ---- setup ----
    def build_data(self, backbone) -> tuple[TaskData | None, TaskData]:
        import open_clip

        mc = backbone.cfg
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=mc.text.context_length)
        audio = self.cfg.data.audio
        eval_transform = open_clip.image_transform(mc.image.image_size, is_train=False)
        eval_data = TaskData(self.cfg, "eval", self.rank, self.world, eval_transform, self.tokenizer, mc.image.image_size,
                             audio)
        train_data = None
        if self.training:
            if not self.cfg.data.train:
                raise ValueError(f"task {self.cfg.task} trains for run.steps={self.cfg.run.steps} steps but data.train is empty")
            train_transform = open_clip.image_transform(mc.image.image_size, is_train=True)
            train_data = TaskData(self.cfg, "train", self.rank, self.world, train_transform, self.tokenizer,
                                  mc.image.image_size, audio)
        self.retention_data = None
        if self.cfg.retention.data:
            retention_cfg = _with_eval_data(self.cfg, self.cfg.retention.data)
            self.retention_data = TaskData(retention_cfg, "eval", self.rank, self.world, eval_transform, self.tokenizer,
                                           mc.image.image_size, audio)
        return train_data, eval_data

    def request_stop(self, signum, frame) -> None:
        log.warning("rank %d got signal %d: checkpointing at the next step boundary", self.rank, signum)
        self.stop_requested = True

    # ---- the recipe ----
    def run(self) -> dict[str, Any]:
        try:
            return self.run_stages()
        finally:
            for sig, handler in self.previous_handlers.items():
                signal.signal(sig, handler)

    def run_stages(self) -> dict[str, Any]:
        cfg = self.cfg
        results: dict[str, Any] = {}
        if self.retention_data is not None and self.step == 0:
            results["retention/before"] = self.retention()
        if cfg.run.baseline and self.training and self.step == 0:
            results["baseline"], _ = self.evaluate()
        if self.training:
            self.train()
        metrics, records = self.evaluate()
        results["metrics"] = metrics
        changed = self.task.after_training() if self.training else None
        if changed:
            results[changed], _ = self.evaluate()
        if self.retention_data is not None:
            results["retention/after"] = self.retention()
        self.metrics.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        self.metrics.close()
        if self.accelerator.is_main_process:
            write_outputs(self.run_dir, cfg, self.task, self.checkpoint, results, records, self.step)
        self.accelerator.wait_for_everyone()
        return results

    def train(self) -> None:
        from mmfuse.progress import progress

        cfg = self.cfg.run
        batches = self.train_data.forever()
        bar = progress(cfg.steps, f"finetune {self.cfg.task}", "step", initial=self.step,
                       disable=not self.accelerator.is_main_process)
        window_start, window_samples = time.perf_counter(), 0
        checked_first_step = False
        self.model.train()
        while self.step < cfg.steps:
            batch = self.to_device(next(batches))
            loss = self.model(batch)
            self.accelerator.backward(loss)
            if self.cfg.optim.grad_clip and not self.cfg.engine.zero_stage:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            window_samples += len(batch["__key__"])
            self.train_used += len(batch["__key__"])
            self.train_skipped.update(batch.get("__errors__", []))
            if not checked_first_step:
                self.check_usable(self.train_data, "data.train", self.train_used, self.train_skipped)
                checked_first_step = True
            bar.update(1)
            stop = self.agree(self.stop_requested)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                loss_value = self.accelerator.reduce(loss.detach().reshape(1), reduction="mean").item()
                self.metrics.log(self.step, {"loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                                             "samples_per_s": window_samples * self.world / max(elapsed, 1e-9)})
                bar.set_postfix(loss=f"{loss_value:.4f}")
                window_start, window_samples = time.perf_counter(), 0
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                metrics, _ = self.evaluate()
                self.metrics.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
            if stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps:
                self.save()
            if stop:
                bar.close()
                raise SystemExit(f"stopped at step {self.step} after a signal; checkpoint committed, rerun to resume")
        bar.close()
        self.report_skipped()

    def check_usable(self, data: TaskData, key: str, used: int, skipped: Counter) -> None:
        """No rank got a usable sample (every file missing or undecodable): an error naming the reasons and a few
        of the split's files, not a run that trains or scores nothing and exits 0."""
        total = self.all_ranks([used, sum(skipped.values())])
        if total[0] == 0:
            reasons = ", ".join(f"{reason}={count}" for reason, count in skipped.most_common()) or "none read"
            raise ValueError(f"{key} yielded no usable sample ({total[1]} skipped; this rank: {reasons}); its first files: "
                             f"{', '.join(repr(redact(path)) for path in example_paths(data))}")

    def report_skipped(self) -> None:
        """The training samples skipped on every rank: in metrics.jsonl, and loud past data.warn_skipped_fraction."""
        used, skipped = self.all_ranks([self.train_used, sum(self.train_skipped.values())])
        fraction = skipped / max(used + skipped, 1)
        self.metrics.log(self.step, {"train/samples": used, "train/skipped_samples": skipped})
        if self.accelerator.is_main_process and fraction > self.cfg.data.warn_skipped_fraction:
            reasons = ", ".join(f"{reason}={count}" for reason, count in self.train_skipped.most_common(5))
            log.warning("!" * 100)
            log.warning("%.1f%% of the training samples read were skipped (%d of %d; rank 0: %s), above "
                        "data.warn_skipped_fraction=%g", 100 * fraction, skipped, used + skipped, reasons,
                        self.cfg.data.warn_skipped_fraction)
            log.warning("!" * 100)

    def all_ranks(self, values: list[int]) -> list[int]:
        """``values`` summed over the ranks."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.long, device=self.accelerator.device)
        dist.all_reduce(total)
        return total.tolist()

    def evaluate(self) -> tuple[dict[str, float], list]:
        task = self.accelerator.unwrap_model(self.model)
        metrics, records = evaluate(task, _OnDevice(self.eval_data, self), self.rank, self.world, self.cfg.data.max_eval_samples)
        if not records:  # the same on every rank: records and skipped counts are gathered
            raise ValueError(f"data.eval yielded no usable sample ({int(metrics['skipped_samples'])} skipped); its first "
                             f"files: {', '.join(repr(redact(path)) for path in example_paths(self.eval_data))}")
        if self.accelerator.is_main_process:
            log.info("eval at step %d: %s", self.step, {k: round(v, 2) for k, v in metrics.items()})
        return metrics, records

    def retention(self) -> dict[str, float]:
        from finetune.tasks.zeroshot import classnames_from_metas, zero_shot_accuracy

        ret = self.cfg.retention
        classnames = classnames_from_metas(self.retention_data.metas())
        backbone = self.accelerator.unwrap_model(self.model).backbone
        was_training = backbone.training
        backbone.eval()
        metrics = zero_shot_accuracy(backbone, self.tokenizer, _OnDevice(self.retention_data, self), classnames,
                                     list(ret.templates), ret.modality, self.rank, self.world)
        backbone.train(was_training)
        return metrics

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.accelerator.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def agree(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # ---- checkpoints: accelerate's state + the loop's, trusted only with COMMITTED ----
    def save(self) -> Path:
        root = self.run_dir / "checkpoints"
        folder = root / tag_for(self.step)
        if self.accelerator.is_main_process:
            uncommit(folder)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(folder))
        mine = {"data": self.train_data.state_dict(), "task_rng": self.task.generator.get_state().tolist()}
        states = [mine]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, mine)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (folder / "trainer_state.json").write_text(json.dumps({"step": self.step, "world_size": self.world,
                                                                   "ranks": states}))
            commit(folder, {"step": self.step, "time": time.time(), "world_size": self.world})
            prune(root, self.cfg.run.keep)
        self.accelerator.wait_for_everyone()
        return folder

    def resume(self) -> None:
        folder = resolve_resume(self.cfg)
        if folder is None:
            self.metrics.resume_at(-1)  # a rerun with nothing committed: an earlier attempt's records are void
            return
        state = json.loads((folder / "trainer_state.json").read_text())
        if state["world_size"] != self.world:
            raise ValueError(f"checkpoint {folder} was written by {state['world_size']} processes, this run has {self.world}: "
                             "resume with the same launch.nproc")
        self.accelerator.load_state(str(folder))
        self.step = int(state["step"])
        self.metrics.resume_at(self.step)
        mine = state["ranks"][self.rank]
        self.train_data.load_state_dict(mine["data"])
        self.task.generator.set_state(torch.tensor(mine["task_rng"], dtype=torch.uint8))
        log.info("resumed from %s at step %d", folder, self.step)


def example_paths(data: TaskData, count: int = 3) -> list[str]:
    """The first files of a split (a shard dataset: its path), for an error message."""
    records = getattr(data, "records", None) or []
    found = [path for record in records for path in (record.image, record.audio) if path]
    return found[:count] or [data.path]


def _with_eval_data(cfg: FinetuneConfig, path: str) -> FinetuneConfig:
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=path, format="auto", eval_images="",
                                                             eval_annotations=""))


class _OnDevice:
    """A TaskData whose batches are moved to the accelerator's device."""

    def __init__(self, data: TaskData, trainer: Finetuner):
        self.data, self.trainer = data, trainer

    def __iter__(self):
        for batch in self.data:
            yield self.trainer.to_device(batch)

"""Metrics out of band of the training math: rank-0 console, ``metrics.jsonl``, TensorBoard, and Weights & Biases
when ``log.wandb=true`` (an optional extra: ``pip install 'mmfuse[wandb]'``)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfuse.redact import redact_values
from mmfuse.schema import ConfigError

log = logging.getLogger("mmfuse.pretrain")


@dataclass
class LogConfig:
    wandb: bool = False
    """Also send every scalar that goes to TensorBoard to Weights & Biases, with the redacted config (needs
    pip install 'mmfuse[wandb]'). WANDB_MODE=offline keeps the run in RUN/wandb/ (wandb sync uploads it later)."""
    wandb_project: str = ""
    """W&B project (empty: WANDB_PROJECT from the environment, else W&B's default)."""


def require_wandb(cfg: LogConfig) -> None:
    """With log.wandb=true, a one-line error before any process starts if the package is missing."""
    if not cfg.wandb:
        return
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb=true needs wandb: pip install 'mmfuse[wandb]'") from None
    online = os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun")
    if online and getattr(getattr(wandb, "api", None), "api_key", "") is None:  # wandb's "not logged in"
        raise ConfigError("log.wandb=true: no W&B API key (run `wandb login` or set WANDB_API_KEY), or log offline "
                          "with WANDB_MODE=offline")


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, cfg: LogConfig | None = None, config: dict[str, Any] | None = None):
        """``config``: the run's config as a dict, recorded with the W&B run after redaction."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._file = None
        self._tb = None
        self._wandb = None
        if enabled:
            self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            self._tb = self._tensorboard()
            if cfg is not None and cfg.wandb:
                self._wandb = self._start_wandb(cfg, config or {})

    def _tensorboard(self, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional at run time
            return None
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)

    def _start_wandb(self, cfg: LogConfig, config: dict[str, Any]):
        require_wandb(cfg)
        import wandb

        # One W&B run per process start, grouped by run folder: a resumed run logs its steps again from the
        # checkpoint's, which W&B (unlike TensorBoard's purge_step) would drop as going back in the same run.
        # No command line, git remote or environment is collected: overrides and remotes can carry credentials.
        settings = wandb.Settings(x_disable_meta=True, disable_git=True, save_code=False)
        return wandb.init(project=cfg.wandb_project or None, name=self.run_dir.name, group=self.run_dir.name,
                          dir=str(self.run_dir), config=redact_values(config), settings=settings)

    def resume_at(self, step: int) -> None:
        """The run goes on from the checkpoint of ``step``: the records of later steps (written before a crash or
        a resume from an earlier checkpoint) are dropped, from metrics.jsonl and from what TensorBoard shows, so
        each step appears once."""
        if not self.enabled:
            return
        self._file.close()
        path = self.run_dir / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if line.strip() and _step_of(line) <= step]
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(path)
        self._file = open(path, "a", buffering=1)
        if self._tb is not None:
            self._tb.close()
            self._tb = self._tensorboard(purge_step=step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        scalars = {name: value for name, value in metrics.items() if isinstance(value, (int, float))}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                          if k.startswith(("loss", "lr", "samples_per_s", "data_wait")))
        if shown:
            log.info("step %d  %s", step, shown)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _step_of(line: str) -> int:
    """A metrics.jsonl record's step; a torn last line (a crash mid-write) counts as after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 2**62

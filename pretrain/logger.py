"""Metrics out of band of the training math: rank-0 console, ``metrics.jsonl``, TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("mmfuse.pretrain")


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if enabled:
            self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # TensorBoard is optional at run time
                self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, step)
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                          if k.startswith(("loss", "lr", "samples_per_s", "data_wait")))
        if shown:
            log.info("step %d  %s", step, shown)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

"""Metrics out of band of the training math: rank-0 console, ``metrics.jsonl``, TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("mmfuse.pretrain")


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._file = None
        self._tb = None
        if enabled:
            self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            self._tb = self._tensorboard()

    def _tensorboard(self, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional at run time
            return None
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)

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


def _step_of(line: str) -> int:
    """A metrics.jsonl record's step; a torn last line (a crash mid-write) counts as after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 2**62

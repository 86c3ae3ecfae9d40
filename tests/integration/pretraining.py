"""How the integration tests run ``python -m pretrain``: the tiny preset on the session's shards, 2 ranks, a few steps."""

import json
import subprocess
import sys
from pathlib import Path


def command(shards, run_dir, *overrides):
    return [sys.executable, "-m", "pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.train={shards}",
            f"run.dir={run_dir}", "data.batch_size=8", "data.workers=1", "data.shuffle_window=16", "run.log_every=1",
            "optim.warmup_steps=2", "optim.lr=2e-3", *overrides]


def pretrain(shards, run_dir, *overrides, check=True):
    result = subprocess.run(command(shards, run_dir, *overrides), capture_output=True, text=True, timeout=540)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]

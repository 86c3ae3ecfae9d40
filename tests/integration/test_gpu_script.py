"""bench/gpu_train.sh rehearsed on the CPU: everything but the GPU itself (the data, the exact ViT-B/16 bf16 ZeRO-2
pretrain command, the metrics and the summary it prints), so a session lent a GPU does not spend it on the glue."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def run_script(tmp_path, **env):
    env = {**os.environ, "PY": sys.executable, "WORK": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", "bench/gpu_train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_the_gpu_benchmark_runs_end_to_end_as_a_cpu_rehearsal(tmp_path):
    # bf16 on a CPU without AVX-512 (AMD EPYC CI machines: AVX2) takes minutes per ViT-B/16 step; fp32 there.
    precision = "bf16" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "fp32"
    done = run_script(tmp_path, REHEARSE="1", STEPS="3", WARMUP="1", LOG_EVERY="1", BATCH="4", WORKERS="1", SAMPLES="32",
                      PRECISION=precision)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = re.search(r"^steps 2-3: (\d+) samples/s, \d+ model TFLOPS/device, MFU (\d+\.\d)%, data wait \d+%, "
                        r"peak GPU memory [\d.]+ GB, loss ([\d.]+)$", done.stdout, re.MULTILINE)
    assert summary, done.stdout[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "work/run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "samples_per_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["mfu"] == pytest.approx(r["tflops_per_device"]) for r in steps)  # the rehearsal's peak: 1 TFLOPS
    assert float(summary.group(3)) == pytest.approx(steps[-1]["loss"], abs=1e-3)
    config = (tmp_path / "work/run/config.yaml").read_text()
    assert re.search(rf"precision: {precision}", config) and re.search(r"zero_stage: 2", config)
    assert re.search(r"flavor: vit-b-16", config)
    model = yaml.safe_load(config)["model"]  # open_clip's ViT-B-16, not the demo preset's conv stem and narrow text
    assert model["image"]["stem"] == "patch" and model["image"]["width"] == 768 and model["text"]["width"] == 512
    assert not list((tmp_path / "work/run").glob("checkpoints/step_*"))  # a benchmark writes no GBs of checkpoint


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_benchmark_stops_at_once_and_says_why(tmp_path):
    done = run_script(tmp_path)
    assert done.returncode != 0 and "no CUDA device" in done.stderr and "REHEARSE=1" in done.stderr
    assert not (tmp_path / "work").exists()  # nothing made before the check

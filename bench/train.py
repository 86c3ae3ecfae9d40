"""Training throughput on CPU: mmfuse pretrain (image-text contrastive, ZeRO-2; and FLIP) vs open_clip's trainer.

    .venv/bin/python bench/train.py [--steps 100] [--warmup 10] [--batch 32] [--out bench/_work/train]

Contenders (each a child process, run one after another, same shards, same tiny architecture, batch per process,
lr, weight decay, betas, eps, warmup steps):

- mmfuse contrastive: ``mmfuse pretrain --config configs/pretrain/tiny.yaml`` with every objective but the
  image-text contrastive one at weight 0, ZeRO-2, ``launch.nproc`` 1 and 2.
- mmfuse FLIP: the same with ``objectives.contrastive.use_masked_forward=true mask_ratio=0.5``.
- open_clip: ``python -m open_clip_train.main`` in ``bench/_work/venv-openclip`` with the model config the tiny flavor
  maps to (``pretrain.model.towers.open_clip_config``) written as ``mmfuse-tiny.json`` into that venv's
  ``open_clip/model_configs``; 1 process, ``--device cpu --precision fp32 --workers 1``, resampled shards with
  ``--train-num-samples steps x batch`` so one epoch is ``steps`` steps.

samples/s: the samples of the steps after the first ``warmup`` / their wall time (for mmfuse from the
``samples_per_s`` windows of metrics.jsonl, logged every 5 steps; for open_clip from its per-step
``Batch (t)`` log lines, ``--log-every-n-steps 1``). Both time data wait + forward + backward + optimizer step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "bin"
OC_PY = ROOT / "bench" / "_work" / "venv-openclip" / "bin" / "python"
SHARDS = ROOT / "demo" / "shards"
LOG_EVERY = 5


def ensure_shards() -> None:
    if len(list(SHARDS.glob("shard-*.tar"))) >= 8:
        return
    raw = ROOT / "bench" / "_work" / "train-raw"
    subprocess.run([str(VENV / "mmfuse"), "synth", f"output.path={raw}", "num_samples=1024", "seed=0"], check=True)
    subprocess.run([str(VENV / "mmfuse"), "shard", "--config", "configs/data/shapes.yaml",
                    f"input.path={raw}/manifest.parquet", f"output.path={SHARDS}"], check=True, cwd=ROOT)


def run_mmfuse(name: str, nproc: int, flip: bool, args, out: Path) -> dict:
    run_dir = out / f"{name} x{nproc}".replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(VENV / "mmfuse"), "pretrain", "--config", "configs/pretrain/tiny.yaml",
           f"data.train={SHARDS}", f"run.dir={run_dir}", f"run.steps={args.steps}", f"run.log_every={LOG_EVERY}",
           "run.checkpoint_every=0", f"data.batch_size={args.batch}", f"launch.nproc={nproc}", "engine.zero_stage=2",
           "objectives.masked_image.weight=0", "objectives.masked_audio.weight=0",
           "objectives.masked_text.weight=0", "objectives.cross_modal_masked.weight=0",
           # pairs={image_text: 1.0} would merge into the default dict (OmegaConf), keeping the audio pairs on:
           # zero them one by one, and skip the FLAC members unread (open_clip never reads them either).
           "objectives.contrastive.pairs.image_text=1.0", "objectives.contrastive.pairs.audio_text=0",
           "objectives.contrastive.pairs.image_audio=0", "data.members.audio=''"]
    if flip:
        cmd += ["objectives.contrastive.use_masked_forward=true", "objectives.contrastive.mask_ratio=0.5"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    (out / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    result = {"contender": name, "processes": nproc, "command": " ".join(cmd), "wall_s": time.time() - t0,
              "rc": proc.returncode}
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        result["error"] = (proc.stderr or proc.stdout)[-1500:]
        return result
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "samples_per_s" in r and r.get("step", 0) > args.warmup]
    rates = [r["samples_per_s"] for r in rows]
    if not rates:
        result["error"] = "no samples_per_s after warm-up in metrics.jsonl"
        return result
    result["samples_per_s"] = len(rates) / sum(1.0 / r for r in rates)  # equal-sample windows: samples / time
    result["windows"] = rates
    result["losses"] = sorted(k for k in rows[-1] if k.startswith("loss/"))
    result["data_wait_fraction"] = sum(r.get("data_wait_fraction", 0.0) for r in rows) / len(rows)
    return result


def run_open_clip(args, out: Path) -> dict:
    result = {"contender": "open_clip (open_clip_train.main)", "processes": 1}
    if not OC_PY.exists():
        result["error"] = f"{OC_PY} missing"
        return result
    check = subprocess.run([str(OC_PY), "-c", "import open_clip, open_clip_train, os; "
                            "print(open_clip.__version__, os.path.dirname(open_clip.__file__))"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        result["error"] = "open_clip_train does not import: " + check.stderr[-800:]
        return result
    version, pkg = check.stdout.split()
    result["version"] = version
    sys.path.insert(0, str(ROOT))
    from mmfuse.config import load_config
    from pretrain.model.config import ModelConfig
    from pretrain.model.towers import open_clip_config
    model_cfg = open_clip_config(load_config(ModelConfig, [str(ROOT / "configs/model/tiny.yaml")]))
    (Path(pkg) / "model_configs" / "mmfuse-tiny.json").write_text(json.dumps(model_cfg, indent=2))
    logs = out / "open_clip-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    tars = sorted(SHARDS.glob("shard-*.tar"))
    pattern = str(SHARDS / f"shard-{{000000..{len(tars) - 1:06d}}}.tar")
    cmd = [str(OC_PY), "-m", "open_clip_train.main", "--model", "mmfuse-tiny", "--train-data", pattern,
           "--dataset-type", "webdataset", "--dataset-resampled", "--train-num-samples", str(args.steps * args.batch),
           "--batch-size", str(args.batch), "--lr", "1e-3", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98",
           "--eps", "1e-6", "--warmup", "20", "--epochs", "1", "--workers", "1", "--precision", "fp32",
           "--device", "cpu", "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "",
           "--logs", str(logs), "--name", "run", "--seed", "0"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=args.timeout)
    text = proc.stdout + proc.stderr
    (out / "open_clip.log").write_text(text)
    result.update(command=" ".join(cmd), wall_s=time.time() - t0, rc=proc.returncode)
    steps = []
    for line in text.splitlines():
        m = re.search(r"Train Epoch: \d+ \[\s*(\d+)/.*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,", line)
        if m:
            steps.append((int(m.group(1)) // args.batch, float(m.group(2))))
    rates = [r for step, r in steps if step > args.warmup]
    if proc.returncode != 0 or not rates:
        result["error"] = text[-1500:]
        return result
    result["samples_per_s"] = len(rates) / sum(1.0 / r for r in rates)
    result["steps_logged"] = len(steps)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "bench" / "_work" / "train"))
    p.add_argument("--only", default="", help="comma-separated subset: oc,c1,c2,f1,f2")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_shards()
    plan = [("oc", lambda: run_open_clip(args, out)),
            ("c1", lambda: run_mmfuse("mmfuse contrastive ZeRO-2", 1, False, args, out)),
            ("f1", lambda: run_mmfuse("mmfuse FLIP 0.5 ZeRO-2", 1, True, args, out)),
            ("c2", lambda: run_mmfuse("mmfuse contrastive ZeRO-2", 2, False, args, out)),
            ("f2", lambda: run_mmfuse("mmfuse FLIP 0.5 ZeRO-2", 2, True, args, out))]
    only = set(filter(None, args.only.split(",")))
    results = []
    for key, fn in plan:
        if only and key not in only:
            continue
        try:
            r = fn()
        except subprocess.TimeoutExpired as e:
            r = {"contender": key, "processes": 0, "error": f"timed out after {e.timeout}s"}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "error"}), flush=True)
        if "error" in r:
            print("ERROR:", r["error"], flush=True)
    base = next((r.get("samples_per_s") for r in results if r["contender"].startswith("open_clip")), None)
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {os.cpu_count()} CPUs, "
             f"batch {args.batch}/process, {args.steps} steps, first {args.warmup} steps warm-up",
             "", "| contender | processes | samples/s | vs open_clip |", "|---|---|---|---|"]
    for r in results:
        sps = r.get("samples_per_s")
        ratio = f"{sps / base:.2f}x" if sps and base else "n/a"
        lines.append(f"| {r['contender']} | {r['processes']} | {sps:.1f} | {ratio} |" if sps else
                     f"| {r['contender']} | {r['processes']} | failed | n/a |")
    table = "\n".join(lines)
    print(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# One accelerator, under 5 minutes: ViT-B/16 image tower + 12-layer text tower (configs/model/vit-b-16.yaml, the
# open_clip ViT-B-16 architecture), bf16, ZeRO-2, image-text contrastive, on synthetic shards; prints samples/s and
# MFU (model FLOPs from pretrain/flops.py over the device's dense bf16 peak, pretrain/flops.py:PEAK_TFLOPS).
#
#   bash bench/gpu_train.sh                       # STEPS=300 BATCH=128 WORKERS=12 SAMPLES=2048 by default
#   STEPS=500 BATCH=256 COMPILE='[image,text]' bash bench/gpu_train.sh
#
# On a GPU machine without this checkout's .venv (a bare PyTorch image, no internet): bench/gpu_wheels.sh makes the
# wheels to carry, and its header says how to install them there and run this script with PY=python3.
#
# Text padding is not trimmed (engine.trim_text_padding=false): the model FLOPs count the full context, so MFU then
# counts only work that ran. Not part of CI. Record what it prints (and the GPU name) in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WORK=${WORK:-bench/_work/gpu_train}
STEPS=${STEPS:-300}
WARMUP=${WARMUP:-50}          # steps left out of the averages (allocator warm-up, loader start)
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-12}
SAMPLES=${SAMPLES:-2048}      # the synthetic world is small; the loader goes round it as often as needed
COMPILE=${COMPILE:-[]}
LOG_EVERY=${LOG_EVERY:-10}
# REHEARSE=1: the same run on the CPU (bf16 included) with a made-up 1 TFLOPS peak, so that everything but the
# GPU itself (data, the pretrain command, the metrics, this summary) is checked where no GPU is lent:
# tests/integration/test_gpu_script.py runs it with a few steps.
REHEARSE=${REHEARSE:-0}
PRECISION=${PRECISION:-bf16}  # a rehearsal on a CPU without AVX-512 sets fp32: bf16 there runs minutes per step
EXTRA=()

if [ "$REHEARSE" = 1 ]; then
    EXTRA=(engine.peak_tflops=1)
    echo "rehearsal on the CPU: the numbers below say nothing about a GPU"
else
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this benchmark needs a GPU (REHEARSE=1 runs it on the CPU)")'
    "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
    df -h /dev/shm | tail -1 | awk '{print "/dev/shm:", $2, "(workers hand batches over in it; a few GB are needed)"}' || true
    if [ "$COMPILE" != "[]" ] && ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
        echo "COMPILE=$COMPILE needs a C compiler for Triton's launchers; none here" >&2
        exit 2
    fi
fi

start=$(date +%s)
if [ ! -f "$WORK/shards/sizes.json" ]; then
    "$PY" -m mmfuse.cli synth output.path="$WORK/raw" num_samples="$SAMPLES" image_size=224 seed=0
    "$PY" -m mmfuse.cli shard input.path="$WORK/raw/manifest.parquet" output.path="$WORK/shards" \
        output.samples_per_shard=256 image.size=224 image.resize_mode=center_crop progress=false
fi
echo "data ready after $(( $(date +%s) - start )) s"

rm -rf "$WORK/run"
# model.image.stem and model.text.width undo the demo preset's small-image choices (configs/pretrain/tiny.yaml): the
# run is open_clip's ViT-B-16 architecture exactly.
"$PY" -m mmfuse.cli pretrain --config configs/pretrain/tiny.yaml model.flavor=vit-b-16 \
    model.image.stem=patch model.text.width=512 \
    data.train="$WORK/shards" run.dir="$WORK/run" data.batch_size="$BATCH" data.workers="$WORKERS" \
    data.mode=resampled data.samples_per_epoch=$((STEPS * BATCH)) data.shuffle_window=1024 data.members.audio="''" \
    objectives.masked_image.weight=0 objectives.masked_audio.weight=0 objectives.masked_text.weight=0 \
    objectives.cross_modal_masked.weight=0 objectives.contrastive.pairs.audio_text=0 \
    objectives.contrastive.pairs.image_audio=0 \
    model.freeze="[audio]" engine.zero_stage=2 engine.precision="$PRECISION" engine.compile="$COMPILE" run.deterministic=false \
    engine.trim_text_padding=false \
    run.steps="$STEPS" run.log_every="$LOG_EVERY" run.checkpoint_every=0 run.save_at_end=false optim.warmup_steps=20 launch.nproc=1 \
    ${EXTRA[@]+"${EXTRA[@]}"}

"$PY" - "$WORK/run/metrics.jsonl" "$WARMUP" "$LOG_EVERY" <<'EOF'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
rows = [r for r in rows if "samples_per_s" in r and r["step"] > int(sys.argv[2])]
if not rows:
    sys.exit("no metric windows after the warm-up steps: raise STEPS")
# Equal-sample windows: the harmonic mean of the window rates is samples / time.
rate = len(rows) / sum(1 / r["samples_per_s"] for r in rows)
tflops = len(rows) / sum(1 / r["tflops_per_device"] for r in rows)
mfu = [r["mfu"] for r in rows if "mfu" in r]
print(f"steps {rows[0]['step'] - int(sys.argv[3]) + 1}-{rows[-1]['step']}: {rate:.0f} samples/s, {tflops:.0f} model TFLOPS/device, "
      + (f"MFU {len(mfu) / sum(1 / m for m in mfu):.1%}" if mfu else "MFU n/a (unknown GPU: set engine.peak_tflops)")
      + f", data wait {sum(r['data_wait_fraction'] for r in rows) / len(rows):.0%}, "
      + f"peak GPU memory {max(r.get('gpu_allocated_gb', 0) for r in rows):.1f} GB, loss {rows[-1]['loss']:.3f}")
EOF
echo "total $(( $(date +%s) - start )) s"

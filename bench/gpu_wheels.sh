#!/usr/bin/env bash
# Wheels for running bench/gpu_train.sh on a GPU machine that has Python, torch (and numpy, pillow, timm,
# transformers, accelerate, pyarrow, tensorboard, ...) but none of mmfuse's other packages and no internet.
# Downloads binary wheels for that machine's Python (PYVER, default 3.12) into .whl/, at the versions of this
# checkout's .venv, and builds deepspeed's (an sdist: pure Python, its ops compile on first use).
#
#   bash bench/gpu_wheels.sh                      # here, with internet; .whl/ is git-ignored (.git/info/exclude)
#   # there, in the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site PY=python3 bash bench/gpu_train.sh
#
# The list is what `mmfuse synth`, `mmfuse shard` and `mmfuse pretrain` import (traced on 2026-11-28), less what a
# PyTorch image already holds; typing_extensions is included because pydantic needs a recent one.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PACKAGES=(annotated-types braceexpand cffi ftfy hjson omegaconf open-clip-torch pycparser pydantic pydantic-core
          simplejpeg soundfile soxr typing-extensions typing-inspection wcwidth webdataset)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p "$DEST"
version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$(version "$name")")
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$DEST" "${pins[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
ls -la "$DEST"
du -sh "$DEST"

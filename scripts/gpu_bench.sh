#!/usr/bin/env bash
# The GPU bench (issue: vit_h in bf16, per-stage ms) as one prepared command for a GPU machine that
# has PyTorch but no network and no project venv.
#
#   scripts/gpu_bench.sh fetch    # here, with the package registry: wheels of what that machine lacks -> .whl/
#   scripts/gpu_bench.sh run      # there, in the repo root, with .whl/ next to it: install, write the
#                                 # real-size vit_h cache, bench bf16 and fp32; reports -> $OUT (or ./gpu-bench)
#
# The GPU image's own transformers (5.x) breaks groundingdino-py, so the pinned one and the tokenizers /
# huggingface_hub it needs travel too; versions come from requirements.lock. The /predict batch figure
# needs the HTTP stack (Flask, label-studio-sdk) and is skipped there; it is a CPU figure here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS=.whl
# Pure-Python or abi3 packages the GPU image lacks or has in a version groundingdino-py can't use.
PACKAGES=(transformers tokenizers huggingface_hub segment-anything supervision addict yapf platformdirs)
GPU_PYTHON_VERSION=3.12  # the GPU image's python3 (/work/.library/device/KINDS.md)

pinned() {  # NAME==VERSION from requirements.lock
    local line
    line=$(grep -i -E "^$1==" requirements.lock) || { echo "gpu_bench: $1 is not in requirements.lock" >&2; exit 2; }
    echo "$line"
}

fetch() {
    local python=.venv/bin/python
    [ -x "$python" ] || python=python3
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    local specs=()
    for name in "${PACKAGES[@]}"; do specs+=("$(pinned "$name")"); done
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${specs[@]}"
    # groundingdino-py ships as an sdist; its setup.py builds no extension, so the wheel is pure Python.
    "$python" -m pip wheel -q --no-deps -w "$WHEELS" "$(pinned groundingdino-py)"
    ls -1 "$WHEELS"
    du -sh "$WHEELS"
}

run() {
    local out=${OUT:-gpu-bench} site=/tmp/gpu-bench-site cache=/tmp/grounded-sam-bench-cache
    mkdir -p "$out"
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_bench: no wheels in $WHEELS; run 'scripts/gpu_bench.sh fetch' first" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
        | tee -a "$out/gpu.txt"
    python3 -m bench.cache --out "$cache" --sam vit_h
    python3 -m bench --cache "$cache" --device cuda --sam vit_h --precision bf16 --skip batch \
        --json "$out/vit_h_bf16.json" 2> "$out/vit_h_bf16.log" | tee "$out/vit_h_bf16.txt"
    python3 -m bench --cache "$cache" --device cuda --sam vit_h --precision fp32 --skip batch --skip memory \
        --json "$out/vit_h_fp32.json" 2> "$out/vit_h_fp32.log" | tee "$out/vit_h_fp32.txt"
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    *) echo "usage: scripts/gpu_bench.sh fetch|run" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that the GPU machine lacks, for Python 3.12 on
# manylinux x86_64, without dependencies. The GPU image has torch 2.11, triton 3.6, transformers 5.x,
# peft, huggingface-hub, safetensors, regex, requests, filelock, numpy, Pillow, tqdm, timm, torchvision,
# zipp, pytest, pytest-benchmark, but not:
#   diffusers          (needs importlib_metadata, missing there; importlib_metadata needs lazy-importer)
#   open_clip_torch    (needs ftfy, missing there; ftfy needs wcwidth, missing there)
# Versions are the ones the test suite passes with. Usage: bash bench/gpu/wheels.sh [DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${1:-$ROOT/.whl}"
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 importlib_metadata==10.2.0 lazy-importer==0.1.0)
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "wheelhouse $DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1048576)) MiB"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "wheelhouse over 60 MiB: the device tool carries at most 64 MiB with the tree" >&2
    exit 1
fi

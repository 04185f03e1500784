#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that the GPU machine lacks, for Python 3.12 on
# manylinux x86_64, without dependencies. The GPU image has torch 2.11, triton 3.6, transformers 5.x,
# peft, huggingface-hub, safetensors, regex, requests, filelock, numpy, Pillow, tqdm, timm, torchvision,
# zipp, pytest, pytest-benchmark, but not:
#   diffusers          (needs importlib_metadata, missing there; importlib_metadata needs lazy-importer)
#   open_clip_torch    (needs ftfy, missing there; ftfy needs wcwidth, missing there)
# The pins and each wheel's own dependencies are data: bench/gpu/wheels.json (checked by
# bench/gpu/wheelhouse.py, here after the download and in the test suite). Usage: bash bench/gpu/wheels.sh [DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${1:-$ROOT/.whl}"
mapfile -t WHEELS < <(python3 "$ROOT/bench/gpu/wheelhouse.py" pins)
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
python3 "$ROOT/bench/gpu/wheelhouse.py" verify "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "wheelhouse $DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1048576)) MiB"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "wheelhouse over 60 MiB: the device tool carries at most 64 MiB with the tree" >&2
    exit 1
fi

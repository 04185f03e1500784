#!/usr/bin/env bash
# Check the wheelhouse against a clean Python 3.12 with the GPU image's torch (2.11), on this CPU
# machine: a venv from pyenv's 3.12, torch 2.11 + the GPU image's other packages from PyPI (about
# 3 GB, a few minutes), then the wheels and g2rpo installed with --no-deps --target as run.sh does,
# and `import g2rpo, diffusers, open_clip` plus a tiny FluxPipeline. Not part of CI (the download).
#   bash bench/gpu/check_wheels.sh [WORKDIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-/tmp/g2rpo_py312}"
PY312="${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python}"
[ -x "$PY312" ] || { echo "no Python 3.12 at $PY312 (set PY312)" >&2; exit 2; }
ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 || bash "$ROOT/bench/gpu/wheels.sh"
mkdir -p "$WORK"
[ -x "$WORK/venv/bin/python" ] || "$PY312" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
PIP_CONSTRAINT= "$V" -m pip install -q torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 huggingface_hub==1.33.0 \
    safetensors regex requests filelock numpy pillow tqdm timm pyyaml scipy scikit-learn peft zipp matplotlib setuptools
rm -rf "$WORK/site"
"$V" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$ROOT"/.whl/*.whl
(cd "$ROOT" && "$V" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$WORK/site" .)
cd "$WORK" && PYTHONPATH="$WORK/site" "$V" -c "
import sys, torch, g2rpo, diffusers, open_clip, g2rpo.ops as ops, g2rpo.train, g2rpo.rewards
from g2rpo.testing.tiny import tiny_flux_pipeline
tiny_flux_pipeline()
print('ok: Python', sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__,
      'open_clip', open_clip.__version__, 'g2rpo from', g2rpo.__file__, 'backends', ops.available_backends())"

"""Loads the compiled extension (``g2rpo._C``) when it was built; ImportError otherwise."""

from __future__ import annotations

import importlib

_C = importlib.import_module("g2rpo._C")  # registers torch.ops.g2rpo_C.*
cuda = bool(getattr(_C, "WITH_CUDA", 0))  # built with csrc/sde_ops_cuda.cu (G2RPO_BUILD_CUDA=1)

"""Builds the optional C++ op ``g2rpo._C`` (csrc/); metadata lives in pyproject.toml.

The CPU op builds by default (a few seconds); the CUDA op is added only with
``G2RPO_BUILD_CUDA=1`` when torch has CUDA and a toolkit is found. A failed build is
reported and dropped: the package then runs on its Triton/torch backends.
Install with ``pip install --no-build-isolation -e .`` after torch (see README).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _extensions():
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("g2rpo: torch not importable at build time; skipping the C++ op", file=sys.stderr)
        return [], build_ext
    sources = ["csrc/sde_ops.cpp"]
    flags = {"cxx": ["-O3", "-fopenmp"]}
    ext_cls = cpp_extension.CppExtension
    if os.environ.get("G2RPO_BUILD_CUDA") == "1":
        import torch

        if torch.version.cuda and cpp_extension.CUDA_HOME:
            sources.append("csrc/sde_ops_cuda.cu")
            flags["nvcc"] = ["-O3"]
            flags["cxx"].append("-DG2RPO_WITH_CUDA")
            ext_cls = cpp_extension.CUDAExtension
        else:
            print("g2rpo: G2RPO_BUILD_CUDA=1 but no CUDA torch/toolkit; building the CPU op only", file=sys.stderr)
    ext = ext_cls("g2rpo._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"],
                  depends=["csrc/ops_common.h"])

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build the op if possible; on failure keep going without it (torch ninja errors included)."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001
                print(f"g2rpo: building the C++ op failed ({err}); using the Triton/torch backends",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                print(f"g2rpo: building {ext.name} failed ({err}); using the Triton/torch backends",
                      file=sys.stderr)

    return [ext], OptionalBuildExt


if os.environ.get("G2RPO_NO_EXT") == "1":
    setup()
else:
    exts, cmd = _extensions()
    setup(ext_modules=exts, cmdclass={"build_ext": cmd})

"""Package declaration; metadata lives in pyproject.toml.

The optional C++ op in ``csrc/`` will be built here with torch.utils.cpp_extension
(see issue 8); until then this only declares the package.
"""

from setuptools import setup

setup()

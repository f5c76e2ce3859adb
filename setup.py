"""setuptools shim: metadata lives in pyproject.toml.

`kernels/` is installed as `fastground.kernels` (see package-dir there). The C++ ops in
`csrc/` are built on first use with torch.utils.cpp_extension and ninja, so an install
needs no compiler; without one the pure-Python references run (fastground.data.packing).
"""
from setuptools import setup

setup()

"""setuptools shim: metadata lives in pyproject.toml; this file maps the layout.

`kernels/` is installed as `fastground.kernels`. The C++ ops in `csrc/` are built on first
use with torch.utils.cpp_extension and ninja, so an install needs no compiler; without one
the pure-Python references run.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastground", "fastground.*"])
packages += ["fastground.kernels"] + [f"fastground.kernels.{p}" for p in find_packages("kernels")]
packages += ["fastground.csrc"]

setup(
    packages=packages,
    package_dir={"fastground": "fastground", "fastground.kernels": "kernels", "fastground.csrc": "csrc"},
    package_data={"fastground.csrc": ["*.cpp", "*.h"]},
)

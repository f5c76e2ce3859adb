import os

# Triton kernels run on CPU tensors under the interpreter when no GPU is present. The
# variable must be set before any kernel module is imported (triton.jit reads it then).
try:
    import torch

    _has_gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item):
    """`@pytest.mark.requires("peft", ...)`: the one rule for optional packages. The README's
    test command installs all of them; without one, its tests skip and name it."""
    import importlib.util

    import pytest

    for mark in item.iter_markers("requires"):
        missing = [m for m in mark.args if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"needs {', '.join(missing)} (installed by pip install -e '.[test]')")

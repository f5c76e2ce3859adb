"""When the fast modules can run, and in which dtype. The kernel-level decisions (Triton or
not, fp32 precision, dropout seeds, launching) live in fastground.kernels.runtime; the names
the fast modules need are re-exported here."""
from __future__ import annotations

import warnings

import torch

from fastground.kernels.runtime import (  # noqa: F401  (re-exported)
    allow_tf32, dot_precision, draw_seed, record_launches, trace_launches, triton_usable)

_warned = False


def triton_or_warn(*tensors) -> bool:
    """True when the Triton kernels can run on these tensors; otherwise warns once that the
    fast modules compute the reference PyTorch math."""
    global _warned
    if triton_usable(*tensors):
        return True
    if not _warned:
        _warned = True
        warnings.warn("fastground.fast: Triton cannot run here (no CUDA, TRITON_INTERPRET unset); "
                      "the fast modules compute the reference PyTorch math", RuntimeWarning, stacklevel=3)
    return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in: autocast's when it is on (the kernels need one dtype
    for all operands, where F.linear would cast them itself), else the input's."""
    dev = x.device.type
    if dev != "meta" and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def cast(dtype: torch.dtype, *tensors):
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)

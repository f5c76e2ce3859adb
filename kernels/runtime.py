"""The decisions every Triton kernel file shares, made in this one place.

* Where Triton runs: compiled on CUDA tensors, or Triton's CPU interpreter when
  TRITON_INTERPRET=1 was set before the kernel modules were imported (`INTERPRET`,
  `triton_usable`).
* The fp32 precision policy (`dot_precision`): fp32 operands multiply in exact fp32
  ("ieee"), as torch's default matmul does; TF32 only where the user allowed it for torch's
  own matmuls (`torch.backends.cuda.matmul.allow_tf32 = True`, which `python -m
  fastground.train --tf32` sets, or `torch.set_float32_matmul_precision("high"/"medium")`).
  16-bit operands ignore the setting.
* The dropout seed convention (`draw_seed`, `philox_key`): a dropout call without a seed
  draws one from torch's CPU generator, so `torch.manual_seed` repeats a run; the kernels
  get the Philox key derived from it.
* How launches are made (`launch`): every launcher calls it, so one switch can record
  launches instead of running them (`record_launches`, for ahead-of-time compilation on meta
  tensors) or record them while they run (`trace_launches`, for launch counts and the
  precision each launch used).
* Host-side integer helpers (`cdiv`, `pow2`) that launchers call instead of
  triton.cdiv / triton.next_power_of_2 (each of those is a Python call worth microseconds
  on a path that launches tens of kernels per step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from triton import knobs

from . import interpreter_fixes

__all__ = ["INTERPRET", "triton_usable", "allow_tf32", "dot_precision", "draw_seed", "philox_key",
           "dropout_seed", "device_seeds", "prepare_device_seeds", "kernel_seed",
           "launch", "record_launches", "trace_launches", "LaunchRecord", "device_sms", "cdiv", "pow2"]

# The same switch triton.jit reads when a kernel decorator runs: it fixes whether the kernel
# modules hold interpreter or compiled kernels for the life of the process.
INTERPRET = bool(knobs.runtime.interpret)
interpreter_fixes.apply(INTERPRET)  # bf16 dots and rounding of the interpreter, before any kernel runs


def triton_usable(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton path can run on these tensors (CUDA, or the CPU interpreter, or
    while launches are only being recorded)."""
    if INTERPRET or _recorder is not None:
        return True
    return torch.cuda.is_available() and all(t.is_cuda for t in tensors if t is not None)


# --------------------------------------------------------------------------- fp32 precision
def allow_tf32() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls (torch's own switches)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of every tl.dot on operands of this dtype: "ieee" (exact fp32
    products) for fp32 unless TF32 is allowed, then "tf32". For 16-bit operands the value is
    ignored by Triton; "ieee" keeps one compiled variant for them."""
    if dtype == torch.float32 and allow_tf32():
        return "tf32"
    return "ieee"


# --------------------------------------------------------------------------- dropout seeds
def draw_seed() -> int:
    """A dropout seed from torch's CPU generator (torch.manual_seed makes runs repeatable).
    31 bits: the fused-linear kernels pass it as an i32."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


def philox_key(seed: int) -> int:
    """The Philox key a kernel gets for a user seed: always in [2^62, 2^63), so the argument
    is always an i64 and, with do_not_specialize, one compiled kernel serves every seed."""
    return int(seed) % (1 << 62) + (1 << 62)


# Device-side seeds. A seed drawn on the host is baked into a captured CUDA graph: every
# replay would drop the same elements. While a CUDA graph is being captured (or inside
# `device_seeds()`, which the CPU tests use), a dropout call gets its Philox key as a
# one-element int64 device tensor instead: base + counter, where the counter is advanced on
# the device by every call, so each replay of a graph draws fresh masks. The kernels read it
# through a pointer (SEED_PTR); the backward reuses the forward's tensor.
_device_seed_scopes = 0
_SEED_STATE: dict = {}


@contextlib.contextmanager
def device_seeds():
    """Dropout keys from the device counter, as under CUDA-graph capture."""
    global _device_seed_scopes
    _device_seed_scopes += 1
    try:
        yield
    finally:
        _device_seed_scopes -= 1


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def prepare_device_seeds(device: torch.device | str) -> None:
    """Create the device's (base key, counter) outside capture (a host-to-device copy cannot
    be captured); the base comes from torch's generator like every host seed."""
    device = torch.device(device)
    if device not in _SEED_STATE:
        base = torch.tensor([philox_key(draw_seed())], dtype=torch.int64, device=device)
        _SEED_STATE[device] = (base, torch.zeros(1, dtype=torch.int64, device=device))


def dropout_seed(device: torch.device | str) -> int | torch.Tensor:
    """The seed of one dropout call: a host int (give it to philox_key), or under capture /
    device_seeds() a device tensor holding the Philox key itself."""
    device = torch.device(device)
    if not (_device_seed_scopes or _capturing(device)):
        return draw_seed()
    if device not in _SEED_STATE:
        if _capturing(device):
            raise RuntimeError("dropout inside CUDA-graph capture needs runtime.prepare_device_seeds(device) "
                               "before capture (fastground.fast.graphed does this)")
        prepare_device_seeds(device)
    base, counter = _SEED_STATE[device]
    counter.add_(1)
    return base + counter


def kernel_seed(seed: int | torch.Tensor) -> tuple[int | torch.Tensor, bool]:
    """(kernel argument, SEED_PTR): a device key tensor goes in as a pointer, a host seed as
    its Philox key."""
    if isinstance(seed, torch.Tensor):
        return seed, True
    return philox_key(seed), False


# --------------------------------------------------------------------------- host integers
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    """Next power of two >= n, clamped to [lo, hi]."""
    n = int(n)
    p = 1 if n <= 1 else 1 << (n - 1).bit_length()
    return lo if p < lo else hi if p > hi else p


# --------------------------------------------------------------------------- launching
@dataclass
class LaunchRecord:
    """One launch as the tests see it: kernel name, grid, precision and operand dtype."""

    name: str
    grid: tuple
    precision: str | None
    dtype: torch.dtype | None
    num_warps: int
    num_stages: int
    constexprs: dict = field(default_factory=dict)
    args: tuple = ()


_recorder: list | None = None  # record_launches: collect, don't run
_recorder_sms: int = 132
_tracers: list[list] = []  # trace_launches: run and log


def device_sms(device: torch.device | str | None = None) -> int:
    """Streaming multiprocessors the launch heuristics plan for."""
    if _recorder is not None:
        return _recorder_sms
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return _cuda_sms(dev.index if dev.index is not None else torch.cuda.current_device())
    return 108  # planning default off-GPU (interpreter runs, meta tensors)


_SMS: dict[int, int] = {}


def _cuda_sms(index: int) -> int:
    sms = _SMS.get(index)
    if sms is None:
        sms = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(fn))


def _first_float_dtype(args) -> torch.dtype | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    return None


def launch(kernel, grid, args, constexprs, num_warps: int = 4, num_stages: int = 3) -> None:
    """Launch `kernel[grid](*args, **constexprs)`; the only place a kernel is started."""
    if _recorder is not None:
        from .aot import Launch  # the AOT record carries what compilation needs
        _recorder.append(Launch(kernel, tuple(grid), tuple(args), dict(constexprs), num_warps, num_stages))
        return
    if _tracers:
        rec = LaunchRecord(_kernel_name(kernel), tuple(grid), constexprs.get("PRECISION"),
                           _first_float_dtype(args), num_warps, num_stages, dict(constexprs), tuple(args))
        for t in _tracers:
            t.append(rec)
    kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def record_launches(num_sms: int = 132):
    """Collect (not run) every launch made inside; yields the list of aot.Launch. Use with
    meta tensors: the launchers plan for `num_sms` multiprocessors."""
    global _recorder, _recorder_sms
    prev, prev_sms = _recorder, _recorder_sms
    _recorder, _recorder_sms = [], num_sms
    try:
        yield _recorder
    finally:
        _recorder, _recorder_sms = prev, prev_sms


@contextlib.contextmanager
def trace_launches():
    """Run every launch made inside and log it; yields the list of LaunchRecord."""
    log: list[LaunchRecord] = []
    _tracers.append(log)
    try:
        yield log
    finally:
        _tracers.remove(log)

"""Sequence packing: the reference in Python, the fast path in C++ (csrc/packing.cpp).

`pack(ids, labels)` concatenates per-sample 1-D tensors into one row and returns
(input_ids, labels, position_ids, cu_seqlens). Position ids restart at 0 for every sample,
cu_seqlens (int32, n+1) marks the sample boundaries for varlen attention, and the label of
each sample's first token is IGNORE_INDEX: the model shifts labels left by one, so that label
is the target of the previous sample's last token, which must not learn across the boundary.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Sequence

import torch

IGNORE_INDEX = -100

_EXT_NAME = "fastground_packing"
_ext = None
_ext_failed: str | None = None
_ext_lock = threading.Lock()
_warned = False


def pack_reference(ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]):
    """The semantics the C++ op must reproduce bit for bit."""
    if len(ids) != len(labels):
        raise ValueError(f"pack: {len(ids)} id tensors but {len(labels)} label tensors")
    out_ids, out_labels, out_pos, cu = [], [], [], [0]
    for i, (x, y) in enumerate(zip(ids, labels)):
        if x.dim() != 1 or y.dim() != 1:
            raise ValueError(f"pack: sample {i} must be 1-D, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.is_floating_point() or y.is_floating_point() or x.is_complex() or y.is_complex():
            raise ValueError(f"pack: sample {i} must hold integers, got {x.dtype} and {y.dtype}")
        if x.numel() != y.numel():
            raise ValueError(f"pack: sample {i} has {x.numel()} ids but {y.numel()} labels")
        y = y.to(torch.long).clone()
        if y.numel():
            y[0] = IGNORE_INDEX
        out_ids.append(x.to(torch.long))
        out_labels.append(y)
        out_pos.append(torch.arange(x.numel(), dtype=torch.long))
        cu.append(cu[-1] + x.numel())
    if cu[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"pack: {cu[-1]} tokens do not fit the int32 cu_seqlens")
    empty = torch.empty(0, dtype=torch.long)
    cat = lambda ts: torch.cat(ts) if ts else empty.clone()  # noqa: E731
    return cat(out_ids), cat(out_labels), cat(out_pos), torch.tensor(cu, dtype=torch.int32)


def _source_path() -> str:
    # Located through the installed package so an installed copy builds its own source,
    # not whatever checkout happens to be on the path.
    import fastground.csrc

    return os.path.join(os.path.dirname(fastground.csrc.__file__), "packing.cpp")


BUILD_TIMEOUT_S = 300.0  # FASTGROUND_BUILD_TIMEOUT overrides; a normal build takes ~30-60 s


def _build_dir() -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(_EXT_NAME, verbose=False)


def _locked_build(timeout: float):
    """Build under our own flock with a timeout. torch's own FileBaton (a `lock` file
    created with O_EXCL) is never released when a build is killed, and every later build
    then waits forever; while we hold the flock no other fastground build runs, so a `lock`
    file found then is such a leftover and is removed."""
    import fcntl
    import time

    from torch.utils.cpp_extension import load

    build = _build_dir()
    os.makedirs(build, exist_ok=True)
    fd = os.open(os.path.join(build, "fastground.build.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has been building it for over {timeout:.0f} s "
                                       f"(lock in {build})") from None
                time.sleep(0.2)
        stale = os.path.join(build, "lock")
        if os.path.exists(stale):
            os.remove(stale)
        return load(name=_EXT_NAME, sources=[_source_path()], extra_cflags=["-O3"], verbose=False)
    finally:
        os.close(fd)  # releases the flock


def load_extension():
    """Build (first call only, cached by torch under its extensions directory) and return the
    C++ module, or None when it cannot be built, the build lock is held longer than
    FASTGROUND_BUILD_TIMEOUT seconds, or FASTGROUND_NO_CPP=1."""
    global _ext, _ext_failed
    if os.environ.get("FASTGROUND_NO_CPP", "") not in ("", "0"):
        return None
    if _ext is not None or _ext_failed is not None:
        return _ext
    with _ext_lock:
        if _ext is None and _ext_failed is None:
            try:
                timeout = float(os.environ.get("FASTGROUND_BUILD_TIMEOUT", BUILD_TIMEOUT_S))
                _ext = _locked_build(timeout)
            except Exception as e:  # compiler, ninja or headers missing: the reference still works
                last = (str(e).strip().splitlines() or [""])[-1]
                _ext_failed = f"{type(e).__name__}: {last}"
    return _ext


def cpp_available() -> bool:
    return load_extension() is not None


def _warn_fallback() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    if os.environ.get("FASTGROUND_NO_CPP", "") not in ("", "0"):
        why = "FASTGROUND_NO_CPP is set"
    else:
        why = f"the C++ packing op did not build ({_ext_failed})"
    warnings.warn(f"fastground: {why}; packing with the Python reference", RuntimeWarning,
                  stacklevel=3)


def pack(ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]):
    """(input_ids, labels, position_ids, cu_seqlens) of 1-D tensors; see the module docstring."""
    ext = load_extension()
    if ext is None:
        _warn_fallback()
        return pack_reference(ids, labels)
    return ext.pack(list(ids), list(labels))

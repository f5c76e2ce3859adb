"""Measurement machinery shared by the bench suites.

Why it is built this way:

* Device work is asynchronous. Each timed call is bracketed by CUDA events (the figure of
  record) and by a synchronize, so pytest-benchmark's own host timer, which only sees the
  call, measures finished work too.
* Warm-up (module load, torch.compile, cuBLAS/Triton autotuning, DALI pipeline builds,
  optimizer state allocation) runs before pytest-benchmark starts counting.
* Inputs rotate among several sets, so an input that fits in L2 does not flatter a case.
* The two ceilings (copy bandwidth counting read + write, bf16 matmul rate) are measured
  once per session on the same device, and every case reports time / floor against them.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import pytest
import torch

from bench import floors

GIB = 1024 ** 3


# ---------------------------------------------------------------------------- ceilings
@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_dtype: str
    matmul_n: int
    copy_nbytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def _median_time_s(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> Ceilings:
    """A large device-to-device copy (bytes read + written) and a large matrix product on
    random data (zeros run faster than real data on some parts)."""
    gpu = device.type == "cuda"
    copy_nbytes = (1 << 30) if gpu else (64 << 20)
    src = torch.randint(0, 256, (copy_nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = _median_time_s(lambda: dst.copy_(src), device, warmup=3, reps=10 if gpu else 5)
    del src, dst
    # CPU cases run in float32 (bf16 matmuls on CPU are not what anyone trains with).
    dtype = torch.bfloat16 if gpu else torch.float32
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = _median_time_s(lambda: a @ b, device, warmup=3, reps=10 if gpu else 5)
    del a, b
    free_memory(device)
    return Ceilings(copy_bytes_per_s=2 * copy_nbytes / t_copy, matmul_flops_per_s=2 * n ** 3 / t_mm,
                    matmul_dtype=str(dtype).replace("torch.", ""), matmul_n=n, copy_nbytes=copy_nbytes)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- a timed case
@dataclass
class CaseInfo:
    bench: str            # video_branch, audio_branch, image_adapter, attention, train_step, decode_video, ...
    variant: str          # eager, compile, fast, sdpa, flash_attn, pyav, dali
    mode: str             # fwd, fwd+bwd, step, decode
    batch: int
    shape: str            # human-readable input shape
    dtype: str
    cost: floors.Cost | None = None
    items_per_call: int = 0   # samples per call, for samples/s


def _pick_rounds(t_call_s: float, target_s: float, lo: int, hi: int) -> int:
    if t_call_s <= 0:
        return hi
    return max(lo, min(hi, int(target_s / t_call_s)))


def run_case(benchmark, fg, info: CaseInfo, fn: Callable[..., Any], inputs: Sequence[tuple], *,
             before_each: Callable[[], None] | None = None, warmup: int | None = None,
             rounds: int | None = None, extra: dict | None = None) -> dict:
    """Warm up, time `fn(*inputs[i])` with inputs rotated, record the figures.

    `before_each` runs before every call outside the timed region (zeroing gradients,
    say). `rounds` fixes the number of timed calls (default: enough for fg.target_s).
    Returns the figure dict, which also lands in benchmark.extra_info and in the
    session's results.
    """
    device = fg.device
    gpu = device.type == "cuda"
    n_in = len(inputs)
    state = {"i": 0}

    def next_args():
        args = inputs[state["i"] % n_in]
        state["i"] += 1
        if before_each is not None:
            before_each()
        sync(device)
        return args

    free_memory(device)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    mem_before = torch.cuda.memory_allocated(device) if gpu else 0

    # warm-up: compile/autotune/allocate; time the last call to size the run
    n_warm = warmup if warmup is not None else max(2, n_in)
    t_last = 0.0
    for _ in range(n_warm):
        args = next_args()
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        t_last = time.perf_counter() - t0

    if rounds is None:
        rounds = _pick_rounds(t_last, fg.target_s, fg.min_rounds, fg.max_rounds)
    host_s: list[float] = []
    events: list[tuple] = []

    def target(*args):
        if gpu:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            out = fn(*args)
            b.record()
            torch.cuda.synchronize(device)
            host_s.append(time.perf_counter() - t0)
            events.append((a, b))
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            host_s.append(time.perf_counter() - t0)
        return out

    warm_in_pedantic = 1
    benchmark.pedantic(target, setup=lambda: (next_args(), {}), rounds=rounds,
                       warmup_rounds=warm_in_pedantic, iterations=1)
    # a disabled benchmark (--benchmark-disable) calls target once, with no warm-up round
    skip = warm_in_pedantic if len(host_s) > warm_in_pedantic else 0
    host = host_s[skip:]
    dev = [a.elapsed_time(b) / 1e3 for a, b in events[skip:]] if gpu else host
    peak = torch.cuda.max_memory_allocated(device) if gpu else None

    fig = figures(fg, info, dev, host, peak, mem_before)
    if gpu:
        fig.update(gpu_busy(fn, next_args, device))
    if extra:
        fig.update(extra)
    benchmark.extra_info.update(fig)
    fg.record(fig)
    return fig


def gpu_busy(fn: Callable[..., Any], next_args: Callable[[], tuple], device: torch.device) -> dict:
    """One more call under the profiler: the summed duration of its device kernels
    (`gpu_busy_ms`), beside the wall time of the same call (`profiled_wall_ms`). busy << wall
    means the call is host-bound (launch overhead), which timings alone do not show."""
    try:
        from torch.profiler import ProfilerActivity, profile
        args = next_args()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn(*args)
            torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy_us = sum(e.device_time for e in kernels)
        return {"gpu_busy_ms": busy_us / 1e3, "profiled_wall_ms": wall * 1e3, "device_kernels": len(kernels)}
    except Exception as e:  # the profiler is a diagnostic: never lose the case over it
        return {"gpu_busy_error": f"{type(e).__name__}: {e}"[:200]}


def figures(fg, info: CaseInfo, dev_s: list[float], host_s: list[float], peak: int | None,
            mem_before: int) -> dict:
    med = statistics.median(dev_s)
    q = statistics.quantiles(dev_s, n=4) if len(dev_s) >= 2 else [med, med, med]
    fig: dict[str, Any] = {
        "bench": info.bench, "variant": info.variant, "mode": info.mode, "batch": info.batch,
        "shape": info.shape, "dtype": info.dtype, "rounds": len(dev_s),
        "time_ms": med * 1e3, "time_ms_p25": q[0] * 1e3, "time_ms_p75": q[2] * 1e3,
        "time_ms_min": min(dev_s) * 1e3, "host_ms": statistics.median(host_s) * 1e3,
        "timer": "cuda events" if fg.device.type == "cuda" else "perf_counter",
    }
    if info.items_per_call:
        fig["samples_per_s"] = info.items_per_call / med
    if peak is not None:
        fig["peak_mem_gib"] = peak / GIB
        fig["peak_mem_delta_gib"] = (peak - mem_before) / GIB
    if info.cost is not None:
        c = fg.ceilings
        floor_s = info.cost.floor_s(c.matmul_flops_per_s, c.copy_bytes_per_s)
        fig.update({
            "flops": info.cost.flops, "bytes": info.cost.bytes,
            "floor_ms": floor_s * 1e3,
            "floor_compute_ms": info.cost.flops / c.matmul_flops_per_s * 1e3,
            "floor_memory_ms": info.cost.bytes / c.copy_bytes_per_s * 1e3,
            "floor_bound": info.cost.bound(c.matmul_flops_per_s, c.copy_bytes_per_s),
            "ratio": med / floor_s if floor_s > 0 else math.nan,
            "tflops": info.cost.flops / med / 1e12,
            # the measured cuBLAS rate of this device, beside the datasheet MFU below
            "pct_matmul_rate": 100.0 * info.cost.flops / med / c.matmul_flops_per_s,
            "gbps": info.cost.bytes / med / 1e9,
        })
        peak = datasheet_peak(fg.device)
        if peak is not None:
            # One MFU for bench/ and the trainer (fastground.train.metrics.mfu): model FLOPs
            # per second over the datasheet's dense bf16 peak.
            from fastground.train.metrics import mfu
            fig["peak_tflops"] = peak / 1e12
            fig["mfu"] = mfu(info.cost.flops, 1.0, med, 1, peak)
    return fig


def datasheet_peak(device: torch.device) -> float | None:
    """Dense bf16 tensor-core FLOP/s of this device from the vendor's data sheet (None off-GPU
    or for an unknown GPU): the trainer's table, so both report one MFU."""
    from fastground.train.metrics import peak_flops
    return peak_flops(device, None)


# ---------------------------------------------------------------------------- variants
def fast_api():
    """(patch, unpatch) from the fast path, or None when it is not importable."""
    try:
        import fastground
        return fastground.patch, fastground.unpatch
    except (ImportError, AttributeError):
        return None


def require_fast(fg):
    if fg.device.type != "cuda":
        pytest.skip("fast path runs Triton kernels on the GPU; not timed on CPU")
    api = fast_api()
    if api is None:
        pytest.skip("fast path not available (fastground.patch / fastground.unpatch not importable)")
    return api


class Variant:
    """Context manager yielding `call` as the variant runs it: eager as is, compile
    through torch.compile (static shapes, default mode), fast with the model patched
    for the duration (and unpatched after, so later cases see the reference)."""

    def __init__(self, fg, model, variant: str, call: Callable[..., Any]):
        self.fg, self.model, self.variant, self.call = fg, model, variant, call
        self._unpatch = None

    def __enter__(self) -> Callable[..., Any]:
        if self.variant == "eager":
            return self.call
        if self.variant == "compile":
            self.fg.require_compile()
            import torch._dynamo
            torch._dynamo.reset()
            return torch.compile(self.call, dynamic=False)
        if self.variant == "fast":
            patch, unpatch = require_fast(self.fg)
            patch(self.model)
            self._unpatch = unpatch
            return self.call
        raise ValueError(f"unknown variant {self.variant!r}")

    def __exit__(self, *exc) -> None:
        if self._unpatch is not None:
            self._unpatch(self.model)
        if self.variant == "compile":
            import torch._dynamo
            torch._dynamo.reset()
        return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def oom_guard(fg, body: Callable[[], Any]) -> Any:
    """Run body; an out-of-memory error becomes a skip with the reason (after the memory
    is given back, which needs the exception and its frames gone first)."""
    msg = None
    try:
        return body()
    except torch.OutOfMemoryError as e:
        msg = str(e).splitlines()[0][:200]
    free_memory(fg.device)
    pytest.skip(f"out of memory on this device: {msg}")

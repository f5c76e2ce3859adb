"""Deterministic reduction of split-K partial sums.

Kernels that split a long reduction across programs (weight gradients over 16k rows, dQ over
2k keys) write fp32 partials to their own slice instead of using atomics, so a gradient is
bit-identical from run to run; this sums the slices in a fixed order and casts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import cdiv, launch


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, n_parts, numel, scale, group_numel, group_stride,
                         part_stride, GROUPED: tl.constexpr, BLOCK: tl.constexpr):
    # out[e] = scale * sum_s part[s][e]; GROUPED: out[g, i] = scale * sum_s part[g, s, i], so
    # several reductions (the three column sums of a LayerNorm backward) take one launch.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    if GROUPED:
        src = (offs // group_numel) * group_stride + offs % group_numel
    else:
        src = offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_parts):
        acc += tl.load(part_ptr + s * part_stride + src, mask=ok, other=0.0)
    tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


def dense_like(ref: torch.Tensor, n: int, dtype=torch.float32, zero: bool = False) -> torch.Tensor:
    """(n, *ref.shape) buffer whose every slice [i] has ref's memory order, so slice i and ref
    share flat memory indices (what `sum_partials` relies on)."""
    perm = sorted(range(ref.dim()), key=lambda d: (-ref.stride(d), -ref.shape[d]))
    shape = [ref.shape[d] for d in perm]
    make = torch.zeros if zero else torch.empty
    buf = make([n] + shape, dtype=dtype, device=ref.device)
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i + 1
    return buf.permute([0] + inv)


def sum_partials(part: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out = scale * part.sum(0); `part` from `dense_like(out, n)`, `out` dense (any order)."""
    numel = out.numel()
    block = 1024
    launch(_sum_partials_kernel, (cdiv(numel, block),),
           (part, out, part.shape[0], numel, float(scale), numel, 0, numel),
           dict(GROUPED=False, BLOCK=block), num_warps=4, num_stages=1)
    return out


def sum_partial_groups(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[g] = part[g].sum(0) for contiguous part (G, S, N) and out (G, N), in one launch."""
    G, S, N = part.shape
    numel = G * N
    block = 1024
    if numel:
        launch(_sum_partials_kernel, (cdiv(numel, block),),
               (part, out, S, numel, 1.0, N, S * N, N), dict(GROUPED=True, BLOCK=block), num_warps=4, num_stages=1)
    return out

"""Fused Llama-layer ops, forward and backward: RMSNorm, rotary position embedding (RoPE)
and the SwiGLU activation of the MLP.

Each replaces several elementwise passes of transformers' modules over (tokens x width)
tensors with one read and one write, and keeps less for backward:

* ``rms_norm(x, w, eps)``: one pass per row in fp32; backward keeps x and the per-row
  1/rms (tokens x 4 bytes), not the normalised copy. The weight gradient is summed per
  program in fp32 and the partial rows reduced afterwards.
* ``rope(x, cos, sin)``: rotates every head of a position with that position's cos/sin,
  read once per position; x may be the strided (B, H, L, D) view the attention makes.
  Backward is the inverse rotation (the same kernel with the sine's sign flipped).
* ``swiglu(gate, up)``: silu(gate) * up in one pass; backward recomputes the sigmoid from
  gate instead of keeping silu(gate) and the product (saves two (tokens x intermediate)
  tensors per layer).

Numerics: every op computes in fp32 and rounds once to the output dtype, where the
reference modules round after each step in bf16; RMSNorm rounds the normalised row to the
input dtype before the weight multiplies, as transformers' LlamaRMSNorm does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import cdiv, device_sms, launch, pow2, triton_usable

__all__ = ["rms_norm", "rope", "swiglu", "triton_usable"]


# ------------------------------------------------------------------------------ RMSNorm
@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, stride_x, stride_y, eps,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], (w[None, :] * normed).to(y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, N, tiles_per_prog,
                    stride_dy, stride_x, stride_dx, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid.to(tl.int64) * tiles_per_prog * ROWS
    for i in range(0, tiles_per_prog):
        rows = start + i * ROWS + tl.arange(0, ROWS)
        mask = (rows[:, None] < M) & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        n = xf * rstd[:, None]
        dn = dy * w[None, :]
        dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / N)[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * n.to(x.dtype).to(tl.float32), axis=0)  # masked rows load zeros
    tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=cmask)


def _tile(device: torch.device) -> int:
    """Elements per program. On a GPU (and for AOT plans on meta tensors) ~4K keeps a tile
    in registers; the CPU interpreter pays a fixed cost per program instance, so it gets
    few, large ones."""
    return 1 << 16 if device.type == "cpu" else 4096


def _row_tile(n: int, device: torch.device) -> tuple[int, int]:
    """(rows per tile, BLOCK_N): whole rows in registers, so narrow rows share a program
    (one row per program at Vicuna's 4096 on a GPU)."""
    block = pow2(n)
    tile = _tile(device)
    return max(1, min(tile // 64, tile // block)), block


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_warps(block: int) -> int:
    return 4 if block <= 2048 else 8


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        x2 = _rows(x)
        m, n = x2.shape
        y = torch.empty((m, n), dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        rows, block = _row_tile(n, x.device)
        launch(_rms_fwd_kernel, (cdiv(m, rows),), (x2, w, y, rstd, m, n, x2.stride(0), y.stride(0), float(eps)),
               dict(ROWS=rows, BLOCK_N=block), num_warps=_rms_warps(block), num_stages=1)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        rows, block = _row_tile(n, x2.device)
        # enough programs to fill a device, each summing the weight gradient of its tiles
        tiles = cdiv(m, rows)
        progs = max(1, min(tiles, 4 * device_sms(x2.device)))
        per = cdiv(tiles, progs)
        progs = cdiv(tiles, per)
        dw_part = torch.empty((progs, n), dtype=torch.float32, device=x2.device)
        launch(_rms_bwd_kernel, (progs,), (dy2, x2, w, rstd, dx, dw_part, m, n, per, dy2.stride(0), x2.stride(0),
                                           dx.stride(0)), dict(ROWS=rows, BLOCK_N=block),
               num_warps=_rms_warps(block), num_stages=1)
        dw = dw_part.sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dimension, as transformers' LlamaRMSNorm."""
    return _RMSNorm.apply(x, weight, eps)


# ------------------------------------------------------------------------------ RoPE
@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, L, P, HALF,
                 sxb, sxh, sxl, syb, syh, syl, scb, scl,
                 BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    # BLOCK_P (batch, position) pairs per program; cos/sin read once, then every head
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = p // L
    l = p % L
    d = tl.arange(0, BLOCK_D)
    mask = (p[:, None] < P) & (d[None, :] < HALF)
    co = cos_ptr + b[:, None] * scb + l[:, None] * scl + d[None, :]
    so = sin_ptr + b[:, None] * scb + l[:, None] * scl + d[None, :]
    c1 = tl.load(co, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(co + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(so, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(so + HALF, mask=mask, other=0.0).to(tl.float32)
    xo = x_ptr + b[:, None] * sxb + l[:, None] * sxl + d[None, :]
    yo = y_ptr + b[:, None] * syb + l[:, None] * syl + d[None, :]
    for h in range(0, H):
        x1 = tl.load(xo + h * sxh, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xo + h * sxh + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transposed rotation
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(yo + h * syh, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(yo + h * syh + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    bsz, heads, length, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.expand(bsz, length, dim)
    sin = sin.expand(bsz, length, dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    # the output in the input's (B, L, H, D) memory order when that is how the input lies,
    # so the attention's reshape back to (B, L, H*D) stays free
    y = torch.empty_like(x.transpose(1, 2)).transpose(1, 2) if x.transpose(1, 2).is_contiguous() \
        else torch.empty_like(x, memory_format=torch.contiguous_format)
    half = dim // 2
    block_d = pow2(half)
    tile = _tile(x.device)
    block_p = max(1, min(tile // 64, tile // (2 * block_d)))
    positions = bsz * length
    launch(_rope_kernel, (cdiv(positions, block_p),),
           (x, cos, sin, y, heads, length, positions, half, x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2), cos.stride(0), cos.stride(1)),
           dict(BLOCK_P=block_p, BLOCK_D=block_d, BACKWARD=backward), num_warps=4, num_stages=1)
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) rotated as transformers' apply_rotary_pos_emb with cos/sin (B, L, D)
    (B may be 1 and broadcast); differentiable in x."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: expected (B, H, L, D) with an even D, got {tuple(x.shape)}")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return _RoPE.apply(x, cos, sin)


# ------------------------------------------------------------------------------ SwiGLU
@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = g * tl.sigmoid(g) * u
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, do_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = do * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (do * silu).to(du_ptr.dtype.element_ty), mask=mask)


def _swiglu_block(device: torch.device) -> int:
    return 16 * _tile(device) if device.type == "cpu" else 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        block = _swiglu_block(gate.device)
        launch(_swiglu_fwd_kernel, (cdiv(n, block),), (gate, up, out, n), dict(BLOCK=block),
               num_warps=4, num_stages=1)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        block = _swiglu_block(gate.device)
        launch(_swiglu_bwd_kernel, (cdiv(n, block),), (gate, up, dout, dg, du, n),
               dict(BLOCK=block), num_warps=4, num_stages=1)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise (same shapes and dtype)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    return _SwiGLU.apply(gate, up)

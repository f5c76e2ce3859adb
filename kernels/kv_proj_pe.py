"""Cross-attention key/value projections with the temporal position embedding fused in.

    k, v = kv_proj_pe(x, pe_weight, rows_per_pos, num_pos, wk, bk, wv, bv)

computes, for the flattened rows r of x (..., Din),

    xpe[r] = x[r] + pe_weight[(r // rows_per_pos) % num_pos]
    k = xpe @ wk.T + bk,   v = xpe @ wv.T + bv          (wk, wv: (Dout, Din), nn.Linear layout)

Video Q-Former: x is the frame Q-Former output (B, T*32, 768), rows_per_pos=32 (queries per
frame), num_pos=T. Audio: x is (B, clips, 1024), rows_per_pos=1, num_pos=clips.

xpe never exists in memory: the forward adds the PE row while loading the x tile of the GEMM,
and the weight-gradient kernel recomputes it the same way. One launch produces K and V (two
accumulators share each loaded x tile, so x is read once instead of twice).

Numerics match `nn.Linear(x + pe)` in the input dtype: the sum is rounded to x.dtype before the
product (as torch rounds x + pe), products accumulate in fp32, the bias is added in fp32 and the
result rounded once. fp32 inputs multiply in exact fp32 unless the user allowed TF32
(runtime.dot_precision, the one precision policy of the kernels).

Key masks: `row_mask` (N,) marks rows no query attends to (padded frames / clips). Those rows
are never read: their K and V are the bias alone, their dx is zero and they add nothing to
dW or dPE, so a NaN or inf stored in a padded frame reaches no output and no gradient.

Backward (all Triton, deterministic: no atomics):
  dxpe = dk @ wk + dv @ wv        one kernel, one accumulator over both sources
  dx   = dxpe                     (x + pe is an add)
  dpe[t] = sum of dxpe over rows at position t; rows >= num_pos of pe_weight get zeros.
           When x needs no gradient (always in training: it comes from frozen encoders), dK
           and dV are summed per position first and dpe = dk_pos @ wk + dv_pos @ wv is a
           (positions x Din) product instead of an (N x Din) one.
  dwk = dk.T @ xpe, dwv = dv.T @ xpe, dbk = dk.sum(0), dbv = dv.sum(0)   one kernel,
        split over rows into fp32 partials when the output tiles alone cannot fill the GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .partials import sum_partials
from .runtime import cdiv, device_sms, dot_precision, launch, pow2


# --------------------------------------------------------------------------- kernels
@triton.jit
def _kv_fwd_kernel(x_ptr, pe_ptr, wk_ptr, wv_ptr, bk_ptr, bv_ptr, k_ptr, v_ptr, rmask_ptr,
                   n_rows, din, dout, rows_per_pos, num_pos,
                   stride_xm, stride_pe, stride_wk, stride_wv, stride_km, stride_vm,
                   HAS_BIAS: tl.constexpr, HAS_ROW_MASK: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Output tiles of one row block are consecutive program ids: the x tile (the large
    # operand) stays in L2 while all Dout tiles read it; the weights fit L2 whole.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(dout, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < dout
    # Masked rows (keys no query attends to) are never read: their K, V are the bias alone,
    # so a NaN or inf stored there cannot reach any output or gradient.
    load_ok = row_ok
    if HAS_ROW_MASK:
        load_ok = row_ok & (tl.load(rmask_ptr + rows, mask=row_ok, other=0) != 0)
    pos = (rows // rows_per_pos) % num_pos
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    pe_rows = pe_ptr + pos.to(tl.int64)[:, None] * stride_pe
    wk_cols = wk_ptr + cols[None, :] * stride_wk
    wv_cols = wv_ptr + cols[None, :] * stride_wv
    acc_k = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, din, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < din
        a_ok = load_ok[:, None] & k_ok[None, :]
        a = tl.load(x_rows + kk[None, :], mask=a_ok, other=0.0).to(tl.float32)
        a += tl.load(pe_rows + kk[None, :], mask=a_ok, other=0.0).to(tl.float32)
        a = a.to(x_ptr.dtype.element_ty)
        w_ok = k_ok[:, None] & col_ok[None, :]
        wk = tl.load(wk_cols + kk[:, None], mask=w_ok, other=0.0)
        wv = tl.load(wv_cols + kk[:, None], mask=w_ok, other=0.0)
        acc_k = tl.dot(a, wk, acc_k, input_precision=PRECISION)
        acc_v = tl.dot(a, wv, acc_v, input_precision=PRECISION)
    if HAS_BIAS:
        acc_k += tl.load(bk_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_v += tl.load(bv_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    tl.store(k_ptr + r64 * stride_km + cols[None, :], acc_k.to(k_ptr.dtype.element_ty), mask=out_ok)
    tl.store(v_ptr + r64 * stride_vm + cols[None, :], acc_v.to(v_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _kv_bwd_dx_kernel(dk_ptr, dv_ptr, wk_ptr, wv_ptr, dx_ptr, rmask_ptr,
                      n_rows, din, dout,
                      stride_dkm, stride_dvm, stride_wk, stride_wv, stride_dxm,
                      HAS_ROW_MASK: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dxpe = dk @ wk + dv @ wv: both products feed one accumulator, so neither partial
    # product nor a concatenated [dk dv] / [wk; wv] copy is ever written. Also computes
    # dPE = dk_pos @ wk + dv_pos @ wv from per-position sums (then n_rows = positions).
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(din, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < din
    store_ok = row_ok
    if HAS_ROW_MASK:  # masked rows did not use x: their dx is zero
        row_ok = row_ok & (tl.load(rmask_ptr + rows, mask=row_ok, other=0) != 0)
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dout, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < dout
        g_ok = row_ok[:, None] & k_ok[None, :]
        w_ok = k_ok[:, None] & col_ok[None, :]
        gk = tl.load(dk_ptr + r64 * stride_dkm + kk[None, :], mask=g_ok, other=0.0)
        wk = tl.load(wk_ptr + kk[:, None] * stride_wk + cols[None, :], mask=w_ok, other=0.0)
        acc = tl.dot(gk, wk, acc, input_precision=PRECISION)
        gv = tl.load(dv_ptr + r64 * stride_dvm + kk[None, :], mask=g_ok, other=0.0)
        wv = tl.load(wv_ptr + kk[:, None] * stride_wv + cols[None, :], mask=w_ok, other=0.0)
        acc = tl.dot(gv, wv, acc, input_precision=PRECISION)
    tl.store(dx_ptr + r64 * stride_dxm + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=store_ok[:, None] & col_ok[None, :])


@triton.jit
def _pos_sum_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, rmask_ptr, n_rows, din, rows_per_pos, num_pos,
                    stride_am, stride_bm, stride_sa, stride_sb,
                    HAS_ROW_MASK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    # sa[t] = sum of a's rows at position t (and sb from b when the grid's third axis is 2).
    # One program owns one (position, column block, source) and walks every row with that
    # position in a fixed order: a deterministic segmented sum with no atomics.
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < din
    dx_ptr = a_ptr
    dpe_ptr = sa_ptr
    stride_dxm = stride_am
    stride_pe = stride_sa
    if tl.program_id(2) == 1:
        dx_ptr = b_ptr
        dpe_ptr = sb_ptr
        stride_dxm = stride_bm
        stride_pe = stride_sb
    period = rows_per_pos * num_pos
    n_e = tl.cdiv(n_rows, period) * rows_per_pos
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e0 in range(0, n_e, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        rows = (e // rows_per_pos).to(tl.int64) * period + p * rows_per_pos + e % rows_per_pos
        ok = (e < n_e) & (rows < n_rows)
        if HAS_ROW_MASK:
            ok = ok & (tl.load(rmask_ptr + rows, mask=ok, other=0) != 0)
        g = tl.load(dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
                    mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(dpe_ptr + p * stride_pe + cols, acc.to(dpe_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _kv_bwd_dw_kernel(x_ptr, pe_ptr, dk_ptr, dv_ptr, dwk_ptr, dwv_ptr, dbk_ptr, dbv_ptr, rmask_ptr,
                      n_rows, din, dout, rows_per_pos, num_pos, rows_per_split,
                      stride_xm, stride_pe, stride_dkm, stride_dvm,
                      stride_dw_split, stride_dwk, stride_dwv, stride_db_split,
                      HAS_BIAS: tl.constexpr, HAS_ROW_MASK: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Tile (BLOCK_N of Dout) x (BLOCK_D of Din) of dwk and dwv, reduced over this split's
    # rows. xpe is rebuilt on load exactly as in the forward (same rounding), so the
    # gradient is that of the product the forward computed.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_d = tl.cdiv(din, BLOCK_D)
    pid_n = pid // tiles_d
    pid_d = pid % tiles_d
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ins = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    out_ok = outs < dout
    in_ok = ins < din
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    db_k = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_v = tl.zeros([BLOCK_N], dtype=tl.float32)
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, n_rows)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        r64 = rows.to(tl.int64)[:, None]
        pos = (rows // rows_per_pos) % num_pos
        use = row_ok
        if HAS_ROW_MASK:  # masked rows' x never read (0 * NaN would poison dW)
            use = row_ok & (tl.load(rmask_ptr + rows, mask=row_ok, other=0) != 0)
        a_ok = use[:, None] & in_ok[None, :]
        a = tl.load(x_ptr + r64 * stride_xm + ins[None, :], mask=a_ok, other=0.0).to(tl.float32)
        a += tl.load(pe_ptr + pos.to(tl.int64)[:, None] * stride_pe + ins[None, :],
                     mask=a_ok, other=0.0).to(tl.float32)
        a = a.to(x_ptr.dtype.element_ty)
        g_ok = row_ok[:, None] & out_ok[None, :]
        gk = tl.load(dk_ptr + r64 * stride_dkm + outs[None, :], mask=g_ok, other=0.0)
        gv = tl.load(dv_ptr + r64 * stride_dvm + outs[None, :], mask=g_ok, other=0.0)
        acc_k = tl.dot(tl.trans(gk), a, acc_k, input_precision=PRECISION)
        acc_v = tl.dot(tl.trans(gv), a, acc_v, input_precision=PRECISION)
        if HAS_BIAS:
            db_k += tl.sum(gk.to(tl.float32), axis=0)
            db_v += tl.sum(gv.to(tl.float32), axis=0)
    w_ok = out_ok[:, None] & in_ok[None, :]
    base = split.to(tl.int64) * stride_dw_split
    tl.store(dwk_ptr + base + outs[:, None] * stride_dwk + ins[None, :],
             acc_k.to(dwk_ptr.dtype.element_ty), mask=w_ok)
    tl.store(dwv_ptr + base + outs[:, None] * stride_dwv + ins[None, :],
             acc_v.to(dwv_ptr.dtype.element_ty), mask=w_ok)
    if HAS_BIAS:
        # Every Din tile summed the same dk columns; the first one writes them.
        if pid_d == 0:
            tl.store(dbk_ptr + split * stride_db_split + outs, db_k.to(dbk_ptr.dtype.element_ty), mask=out_ok)
            tl.store(dbv_ptr + split * stride_db_split + outs, db_v.to(dbv_ptr.dtype.element_ty), mask=out_ok)


# --------------------------------------------------------------------------- planning
@functools.lru_cache(maxsize=256)
def gemm_config(n_rows: int, n_out: int, n_red: int, dtype: torch.dtype, precision: str = "ieee") -> dict:
    """Tiles for the two row-major GEMMs (forward and dx).

    | case            | BLOCK_M   | BLOCK_N | BLOCK_K | warps | stages |
    |-----------------|-----------|---------|---------|-------|--------|
    | 16-bit / tf32   | 128 (rows >= 128, else pow2 >= 16) | 64 | 64 (tf32: 32) | 8 (4) | 3 |
    | fp32, ieee      | 64        | 64      | 16      | 8     | 2      |
    BLOCK_N / BLOCK_K shrink to the next power of two of small widths (min 16, tl.dot's
    minimum). 128x64 with two accumulators keeps the per-thread accumulator at 64 fp32 with
    8 warps. Exact fp32 runs FMA dots whose operands live in registers: smaller tiles keep
    them clear of spills on sm_80 (tests/test_kernels_aot.py checks both).
    """
    big = n_rows >= 128
    if dtype == torch.float32 and precision == "ieee":
        return dict(BLOCK_M=pow2(n_rows, 16, 64), BLOCK_N=pow2(n_out, 16, 64), BLOCK_K=pow2(n_red, 16, 16),
                    num_warps=8, num_stages=2)
    wide = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128 if big else pow2(n_rows, 16, 128), BLOCK_N=pow2(n_out, 16, 64),
                BLOCK_K=pow2(n_red, 16, wide), num_warps=8 if big else 4, num_stages=3)


@functools.lru_cache(maxsize=256)
def dw_config(n_rows: int, dout: int, din: int, dtype: torch.dtype, sms: int, precision: str = "ieee") -> dict:
    """Weight-gradient tiles: (BLOCK_N of Dout) x (BLOCK_D of Din) per program, both K and V,
    reduced over BLOCK_M rows per step (64 16-bit / 16 fp32, 4 / 8 warps). At release sizes
    (768x768 or 768x1024) that is 144-192 programs, under two waves of an H100, so the rows
    are split until about 2 programs per SM exist, each split keeping >= 4 row blocks of
    work; the splits write fp32 partials summed in a fixed order afterwards."""
    fp32 = dtype == torch.float32
    cfg = dict(BLOCK_M=pow2(n_rows, 16, 16 if fp32 else 64), BLOCK_N=pow2(dout, 16, 64),
               BLOCK_D=pow2(din, 16, 64 if not fp32 or precision != "ieee" else 32),
               num_warps=8 if fp32 else 4, num_stages=2 if fp32 else 3)
    tiles = cdiv(dout, cfg["BLOCK_N"]) * cdiv(din, cfg["BLOCK_D"])
    row_blocks = cdiv(n_rows, cfg["BLOCK_M"])
    split = max(1, min(cdiv(2 * sms, tiles), row_blocks // 4))
    cfg["rows_per_split"] = cdiv(row_blocks, split) * cfg["BLOCK_M"]
    return cfg


# --------------------------------------------------------------------------- launchers
def _kv_forward(x2, pe, rows_per_pos, num_pos, wk, bk, wv, bv, rmask=None, cfg=None):
    n, din = x2.shape
    dout = wk.shape[0]
    k = torch.empty((n, dout), dtype=x2.dtype, device=x2.device)
    v = torch.empty_like(k)
    if n == 0:
        return k, v
    precision = dot_precision(x2.dtype)
    cfg = dict(cfg or gemm_config(n, dout, din, x2.dtype, precision))
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    has_bias = bk is not None
    grid = (cdiv(n, cfg["BLOCK_M"]) * cdiv(dout, cfg["BLOCK_N"]),)
    launch(_kv_fwd_kernel, grid,
           (x2, pe, wk, wv, bk if has_bias else wk, bv if has_bias else wv, k, v,
            rmask if rmask is not None else x2,
            n, din, dout, rows_per_pos, num_pos,
            x2.stride(0), pe.stride(0), wk.stride(0), wv.stride(0), k.stride(0), v.stride(0)),
           dict(HAS_BIAS=has_bias, HAS_ROW_MASK=rmask is not None, PRECISION=precision, **cfg), nw, ns)
    return k, v


def _kv_backward_dx(dk, dv, wk, wv, rmask=None, cfg=None):
    """dk @ wk + dv @ wv, (rows, Din); rows flagged 0 in rmask get zeros."""
    n, dout = dk.shape
    din = wk.shape[1]
    dx = torch.empty((n, din), dtype=dk.dtype, device=dk.device)
    if n == 0:
        return dx
    precision = dot_precision(dk.dtype)
    cfg = dict(cfg or gemm_config(n, din, dout, dk.dtype, precision))
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (cdiv(n, cfg["BLOCK_M"]) * cdiv(din, cfg["BLOCK_N"]),)
    launch(_kv_bwd_dx_kernel, grid,
           (dk, dv, wk, wv, dx, rmask if rmask is not None else dk, n, din, dout,
            dk.stride(0), dv.stride(0), wk.stride(0), wv.stride(0), dx.stride(0)),
           dict(HAS_ROW_MASK=rmask is not None, PRECISION=precision, **cfg), nw, ns)
    return dx


def _position_sums(a, b, rows_per_pos, num_pos, rmask, out_rows):
    """Per-position row sums of a (and b): (out_rows, width) each, rows >= num_pos zero."""
    n, width = a.shape
    sa = torch.zeros((out_rows, width), dtype=a.dtype, device=a.device)
    sb = torch.zeros((out_rows, b.shape[1]), dtype=b.dtype, device=b.device) if b is not None else None
    if n == 0:
        return sa, sb
    block_d = pow2(width, 16, 128)
    block_e = pow2(cdiv(n, num_pos), 16, 64)
    launch(_pos_sum_kernel, (num_pos, cdiv(width, block_d), 1 if b is None else 2),
           (a, b if b is not None else a, sa, sb if sb is not None else sa, rmask if rmask is not None else a,
            n, width, rows_per_pos, num_pos, a.stride(0), (b if b is not None else a).stride(0),
            sa.stride(0), (sb if sb is not None else sa).stride(0)),
           dict(HAS_ROW_MASK=rmask is not None, BLOCK_E=block_e, BLOCK_D=block_d), 4, 2)
    return sa, sb


def _kv_backward_dw(x2, pe, rows_per_pos, num_pos, dk, dv, wk, wv, has_bias, rmask=None, cfg=None):
    n, din = x2.shape
    dout = dk.shape[1]
    if n == 0:
        zb = torch.zeros(dout, dtype=wk.dtype, device=wk.device) if has_bias else None
        return torch.zeros_like(wk), zb, torch.zeros_like(wv), (zb.clone() if has_bias else None)
    precision = dot_precision(x2.dtype)
    cfg = dict(cfg or dw_config(n, dout, din, x2.dtype, device_sms(x2.device), precision))
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    rows_per_split = cfg.pop("rows_per_split")
    split = max(1, cdiv(n, rows_per_split))
    # dwk, dwv, dbk, dbv side by side in one buffer (and their split partials in one more),
    # so the partials of all four are summed by a single launch.
    area = dout * din
    total = 2 * area + (2 * dout if has_bias else 0)

    def views(buf):  # buf (..., total) -> the four gradients as views
        lead = buf.shape[:-1]
        wk_, wv_ = (buf[..., i * area:(i + 1) * area].view(*lead, dout, din) for i in range(2))
        if not has_bias:
            return wk_, wv_, None, None
        return wk_, wv_, buf[..., 2 * area:2 * area + dout], buf[..., 2 * area + dout:]

    flat = torch.empty(total, dtype=wk.dtype, device=wk.device)
    dwk, dwv, dbk, dbv = views(flat)
    if split == 1:
        tk, tv, tbk, tbv = dwk, dwv, dbk, dbv
        s_w = s_b = 0
    else:
        part = torch.empty((split, total), dtype=torch.float32, device=wk.device)
        tk, tv, tbk, tbv = views(part)
        s_w = s_b = total
    grid = (cdiv(dout, cfg["BLOCK_N"]) * cdiv(din, cfg["BLOCK_D"]), split)
    launch(_kv_bwd_dw_kernel, grid,
           (x2, pe, dk, dv, tk, tv, tbk if has_bias else tk, tbv if has_bias else tv,
            rmask if rmask is not None else x2,
            n, din, dout, rows_per_pos, num_pos, rows_per_split,
            x2.stride(0), pe.stride(0), dk.stride(0), dv.stride(0),
            s_w, tk.stride(-2), tv.stride(-2), s_b),
           dict(HAS_BIAS=has_bias, HAS_ROW_MASK=rmask is not None, PRECISION=precision, **cfg), nw, ns)
    if split > 1:
        sum_partials(part, flat)
    return dwk, dbk, dwv, dbv


# --------------------------------------------------------------------------- autograd
class KVProjPE(torch.autograd.Function):
    """x (N, Din) rows, pe (P, Din), wk/wv (Dout, Din), bk/bv (Dout,) or None; all one dtype;
    rmask (N,) int8 or None (0: row never read)."""

    @staticmethod
    def forward(ctx, x2, pe, rows_per_pos, num_pos, wk, bk, wv, bv, rmask):
        k, v = _kv_forward(x2, pe, rows_per_pos, num_pos, wk, bk, wv, bv, rmask)
        ctx.save_for_backward(x2, pe, wk, wv, rmask)
        ctx.geom = (rows_per_pos, num_pos, bk is not None)
        return k, v

    @staticmethod
    def backward(ctx, dk, dv):
        x2, pe, wk, wv, rmask = ctx.saved_tensors
        rows_per_pos, num_pos, has_bias = ctx.geom
        need = ctx.needs_input_grad
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        dv = dv if dv.stride(-1) == 1 else dv.contiguous()
        dx = dpe = dwk = dbk = dwv = dbv = None
        if need[0]:
            dx = _kv_backward_dx(dk, dv, wk, wv, rmask)
            if need[1]:
                dpe, _ = _position_sums(dx, None, rows_per_pos, num_pos, None, pe.shape[0])
        elif need[1]:
            # dx is not wanted: sum dK, dV per position, then one (positions x Din) product.
            dk_pos, dv_pos = _position_sums(dk, dv, rows_per_pos, num_pos, rmask, pe.shape[0])
            dpe = _kv_backward_dx(dk_pos, dv_pos, wk, wv)
        if any(need[4:8]):
            dwk, dbk, dwv, dbv = _kv_backward_dw(x2, pe, rows_per_pos, num_pos, dk, dv, wk, wv, has_bias, rmask)
        return dx, dpe, None, None, dwk, dbk, dwv, dbv, None


def kv_proj_pe(x: torch.Tensor, pe_weight: torch.Tensor, rows_per_pos: int, num_pos: int,
               wk: torch.Tensor, bk: torch.Tensor | None, wv: torch.Tensor, bv: torch.Tensor | None,
               row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of (x + PE) as described in the module docstring.

    x: (..., Din) in the compute dtype (fp32, bf16 or fp16); pe_weight: (P >= num_pos, Din);
    wk, wv: (Dout, Din); bk, bv: (Dout,) or both None; row_mask: x.shape[:-1] (or flat), nonzero
    = row used, zero = row never read (its K, V are the bias). Parameters in another dtype are
    cast to x.dtype (through autograd, so their gradients come back in their own dtype).
    Returns k, v: (..., Dout) in x.dtype, contiguous.
    """
    if (bk is None) != (bv is None):
        raise ValueError("kv_proj_pe: give both biases or neither")
    din = x.shape[-1]
    if pe_weight.shape[-1] != din or wk.shape[1] != din or wv.shape != wk.shape:
        raise ValueError(f"kv_proj_pe: shapes x {tuple(x.shape)}, pe {tuple(pe_weight.shape)}, "
                         f"wk {tuple(wk.shape)}, wv {tuple(wv.shape)} do not fit")
    if not 1 <= num_pos <= pe_weight.shape[0] or rows_per_pos < 1:
        raise ValueError(f"kv_proj_pe: num_pos {num_pos} / rows_per_pos {rows_per_pos} invalid "
                         f"for {pe_weight.shape[0]} embedding rows")
    dt = x.dtype

    def prep(t):
        if t is None:
            return None
        t = t.to(dt)
        return t if t.stride(-1) == 1 else t.contiguous()

    x2 = x.reshape(-1, din)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    rmask = None
    if row_mask is not None:
        if row_mask.numel() != x2.shape[0]:
            raise ValueError(f"kv_proj_pe: row_mask of {row_mask.numel()} entries for {x2.shape[0]} rows")
        rmask = row_mask.reshape(-1)
        rmask = rmask if rmask.dtype == torch.int8 and rmask.is_contiguous() else rmask.ne(0).to(torch.int8).contiguous()
    k, v = KVProjPE.apply(x2, prep(pe_weight), int(rows_per_pos), int(num_pos),
                          prep(wk), prep(bk), prep(wv), prep(bv), rmask)
    lead = x.shape[:-1]
    return k.view(*lead, wk.shape[0]), v.view(*lead, wk.shape[0])

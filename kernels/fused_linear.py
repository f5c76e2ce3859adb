"""Linear layers with fused epilogues, forward and backward, as Triton kernels.

Public entry points (all differentiable w.r.t. every tensor argument):

* ``linear(x, w, b)``                          y = x @ w^T + b
* ``linear_gelu(x, w, b)``                     y = gelu_erf(x @ w^T + b)
* ``linear_dropout_residual_layernorm(...)``   out = LayerNorm(dropout(x @ w^T + b) + residual)
* ``dropout_mask(seed, M, N, p, device)``      the exact keep mask the fused kernel uses

``x`` may have leading batch dimensions; ``w`` is (N, K) as ``nn.Linear`` stores it.

Design choices
--------------
linear_gelu saves ``pre = x @ w^T + b`` in the input dtype (written by the forward GEMM's
epilogue next to ``y``) instead of recomputing it in backward. Recomputing costs a whole
extra GEMM (half again the two backward GEMMs); the stored copy costs M*N elements, what
PyTorch's own autograd keeps for ``F.gelu(F.linear(...))`` too, so memory matches the
reference while the backward does no redundant work.

linear_dropout_residual_layernorm is a GEMM (bias in its epilogue, result kept in fp32)
followed by one row kernel doing dropout + residual + LayerNorm in a single pass. A
single-pass GEMM+LN kernel must hold a full row per tile: at N = 768 that is BLOCK_N = 1024
(25 % of the MMA work on padding), and the 1024-wide fp32 accumulator does not fit in
registers beyond 32 rows. Compiled for sm_80 (bf16, measured with ptxas): 64 x 1024 x 32
tiles at 8 warps spill 16 KB per thread; 32 x 1024 x 64 at 8 warps use 255 registers, still
spill 152 B and take 135 KB of shared memory. With 32-row tiles the Q-Former's M = 512 rows
give 16 CTAs on a 108/132-SM chip, where a plain GEMM with 64 x 64 tiles gives 96; the price
of two kernels is an fp32 round trip of the pre-LN tensor, M * 768 * 8 bytes (3 MB at
M = 512, about 1 us of HBM time). So two kernels.
The dropout mask is never stored: both passes regenerate it with Philox,
``tl.rand(seed, row * N + col) >= p``, so it is reproducible from the seed alone.

The sum entering the LayerNorm is rounded to the input dtype before the statistics are
taken (and that rounded tensor is what backward reads), which mirrors the reference where
the LayerNorm input is a tensor of that dtype.

Bias gradients and LayerNorm weight gradients are reduced deterministically: every
program writes a partial column sum to its own row of a small fp32 buffer, which
``partials.sum_partials`` adds up in a fixed order (no atomics), so two runs with the same
inputs give bit-identical gradients.

Every launch goes through ``aot.launch``, so the AOT test records exactly what these
launchers would run at release shapes.

Block sizes (``gemm_config``), chosen per GEMM from its output shape (M, N) and dtype;
"tiles" is the CTA count the candidate tile gives, 96 is about one wave on A100 (108 SMs)
and H100 (132 SMs):

=========================  ======================  =====  ======  ==========================
case                       BLOCK_M x N x K          warps  stages  why
=========================  ======================  =====  ======  ==========================
16-bit, tiles(128x256)>=96 128 x 256 x 64           8      3       big GEMMs (image adapter),
and no GELU epilogue                                               erf on this tile spills
16-bit, tiles(128x128)>=96 128 x 128 x 64           8      4       llama_proj, Q-Former 3072
16-bit, otherwise          64 x 64 x 64             4      4       small outputs: fill the SMs
fp32, tf32 allowed         128 x 128 x 32           8      3       tensor cores in tf32
fp32, exact (ieee)         64 x 64 x 32             8      3       FMA path, correctness only;
                                                                   4 warps spill on sm_80
=========================  ======================  =====  ======  ==========================

Row kernels use BLOCK_N = next_power_of_2(N) and ROWS = max(1, 4096 // BLOCK_N) rows per
program (forward: 4 warps up to BLOCK_N = 1024, 8 beyond; backward: 8 warps). The
bias-gradient kernel uses 64 x 128 tiles.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .partials import sum_partial_groups, sum_partials
from .runtime import INTERPRET, cdiv, device_sms, dot_precision, dropout_seed, launch, pow2, triton_usable  # noqa: F401

__all__ = ["linear", "linear_gelu", "linear_dropout_residual_layernorm", "dropout_mask",
           "gemm_config", "row_config", "triton_usable"]

# --------------------------------------------------------------------------------------
# device functions
# --------------------------------------------------------------------------------------
@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_erf_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, pre_ptr, rowsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SAVE_PRE: tl.constexpr, ROW_SUM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = epilogue(A @ B), A (M, K) and B (K, N) given by strides, fp32 accumulation.

    Transposed operands (w^T in forward, dy^T in the weight gradient) are expressed by
    strides alone, so one kernel serves all three GEMMs of a linear layer. ROW_SUM also
    writes the row sums of A (the bias gradient, when A = dy^T) from the tiles it loads
    anyway, so a weight gradient needs no separate bias reduction."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-blocks sweep the columns together so the B tiles they
    # share stay in L2.
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % group_size)
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Masks rather than wrapping indices modulo M/N: wrapped indices lose the contiguity
    # the compiler needs to vectorise the transposed (weight-gradient) operand loads.
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROW_SUM:
        rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if ROW_SUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if ROW_SUM:
        # every column tile summed the same rows; the first one writes them
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, rsum.to(rowsum_ptr.dtype.element_ty), mask=m_mask)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + c_offs, acc.to(pre_ptr.dtype.element_ty), mask=c_mask)
    if GELU:
        acc = _gelu_erf(acc)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bias_grad_kernel(
    dy_ptr, pre_ptr, dpre_ptr, part_ptr,
    M, N,
    GELU: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial column sums of d(pre) into part[pid_m, :] (PARTIALS); with GELU also writes
    d(pre) = dy * gelu'(pre). Row-major contiguous (M, N) operands."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    offs = offs_m[:, None] * N + offs_n[None, :]
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = g * _gelu_erf_grad(x)
        tl.store(dpre_ptr + offs, g.to(dpre_ptr.dtype.element_ty), mask=mask)
    if PARTIALS:
        tl.store(part_ptr + pid_m * N + offs_n, tl.sum(g, axis=0), mask=n_mask)


@triton.jit
def _dropout_mask_kernel(out_ptr, seed, total, p, SEED_PTR: tl.constexpr, BLOCK: tl.constexpr):
    # Row-major linear index == row * N + col, the counter the fused kernels use.
    if SEED_PTR:
        seed = tl.load(seed)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < total)


@triton.jit
def _dropout_res_ln_fwd_kernel(
    pre_ptr, res_ptr, w_ptr, b_ptr, out_ptr, z_ptr, mean_ptr, rstd_ptr,
    seed, M, N, p, scale, eps,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if SEED_PTR:  # the seed lives on the device (runtime.dropout_seed under graph capture)
        seed = tl.load(seed)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    r_mask = rows < M
    c_mask = cols < N
    mask = r_mask[:, None] & c_mask[None, :]
    # int64 so the Philox counter row * N + col is exact for any tensor size; the same
    # expression in backward and in dropout_mask regenerates the same mask.
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]

    h = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, offs) >= p
        h = tl.where(keep, h * scale, 0.0)
    r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = (h + r).to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + offs, z, mask=mask)
    z = tl.where(mask, z.to(tl.float32), 0.0)

    mean = tl.sum(z, axis=1) / N
    d = tl.where(mask, z - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    out = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=r_mask)
    tl.store(rstd_ptr + rows, rstd, mask=r_mask)


@triton.jit
def _dropout_res_ln_bwd_kernel(
    dout_ptr, z_ptr, mean_ptr, rstd_ptr, w_ptr, dres_ptr, dpre_ptr, part_ptr,
    seed, M, N, p, scale, rows_per_prog, num_progs,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """LayerNorm backward + dropout-mask regeneration over a contiguous chunk of rows.

    Writes d(residual) = dz and d(pre) = dz * keep * scale, and partial column sums of
    dout * xhat (ln weight), dout (ln bias) and d(pre) (linear bias) to
    part[0|1|2, pid, :] for a deterministic final reduction."""
    pid = tl.program_id(0)
    if SEED_PTR:
        seed = tl.load(seed)
    cols = tl.arange(0, BLOCK_N)
    c_mask = cols < N
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_dlb = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_db = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    row_start = pid * rows_per_prog
    for r0 in range(row_start, row_start + rows_per_prog, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r_mask = rows < M
        mask = r_mask[:, None] & c_mask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_mask, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(xhat * g, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dz = tl.where(mask, (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            keep = tl.rand(seed, offs) >= p
            dh = tl.where(keep, dz * scale, 0.0)
        else:
            dh = dz
        tl.store(dpre_ptr + offs, dh.to(dpre_ptr.dtype.element_ty), mask=mask)
        acc_dw += dy * xhat
        acc_dlb += dy
        acc_db += dh
    tl.store(part_ptr + pid * N + cols, tl.sum(acc_dw, axis=0), mask=c_mask)
    tl.store(part_ptr + (num_progs + pid) * N + cols, tl.sum(acc_dlb, axis=0), mask=c_mask)
    tl.store(part_ptr + (2 * num_progs + pid) * N + cols, tl.sum(acc_db, axis=0), mask=c_mask)


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
_WAVE = 96  # CTAs in about one wave on A100 (108 SMs) / H100 (132 SMs)


def _tiles(M: int, N: int, bm: int, bn: int) -> int:
    return cdiv(M, bm) * cdiv(N, bn)


@functools.lru_cache(maxsize=256)
def gemm_config(M: int, N: int, K: int, dtype: torch.dtype, tf32: bool = False, gelu: bool = False) -> dict:
    """Block sizes, warps and stages for a GEMM with output (M, N) and reduction K (the
    table in the module docstring). The interpreter runs the same table, so CPU tests
    exercise the configurations a GPU launches."""
    if dtype == torch.float32:
        if tf32:
            return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if not gelu and _tiles(M, N, 128, 256) >= _WAVE:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if _tiles(M, N, 128, 128) >= _WAVE:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


@functools.lru_cache(maxsize=64)
def row_config(N: int, backward: bool = False) -> dict:
    """Rows per program and warps of the dropout/residual/LayerNorm row kernels."""
    block_n = pow2(N)
    # Backward holds three (ROWS, BLOCK_N) accumulators plus the Philox state: at 4 warps
    # it spills, at 8 it does not.
    warps = 8 if backward or block_n > 1024 else 4
    return dict(ROWS=max(1, 4096 // block_n), BLOCK_N=block_n, num_warps=warps)


BIAS_GRAD_BLOCK = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4)


def _check_index_range(*tensors: torch.Tensor) -> None:
    # Kernel offsets are int32 products of index and stride.
    for t in tensors:
        if t.numel() >= 2 ** 31:
            raise ValueError(f"tensor of {t.numel()} elements exceeds the int32 indexing of the kernels")


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def _gemm(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
          gelu: bool = False, pre_dtype: torch.dtype | None = None, row_sum: torch.Tensor | None = None):
    """C = a @ b (+ bias) (then GELU), a (M, K) and b (K, N) of any strides; row_sum (M,),
    when given, receives a.sum(1).

    Returns C, or (C, pre) when pre_dtype is given (pre = a @ b + bias before the GELU)."""
    M, K = a.shape
    K2, N = b.shape
    assert K == K2, (a.shape, b.shape)
    _check_index_range(a, b)
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    pre = torch.empty((M, N), device=a.device, dtype=pre_dtype) if pre_dtype is not None else c
    if M == 0 or N == 0:
        return (c, pre) if pre_dtype is not None else c
    if K == 0:
        if row_sum is not None:
            row_sum.zero_()
        c.zero_()
        if bias is not None:
            c += bias.to(out_dtype)
        if pre_dtype is not None:
            pre.copy_(c)
        if gelu:
            c = torch.nn.functional.gelu(c.float()).to(out_dtype)
        return (c, pre) if pre_dtype is not None else c
    precision = dot_precision(a.dtype)
    # The 128x256 tile has no registers left for an epilogue beyond the bias: the GELU or
    # the row sums of the weight-gradient GEMM spill there on sm_80, so those take 128x128.
    cfg = dict(gemm_config(M, N, K, a.dtype, precision == "tf32", gelu or row_sum is not None))
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    launch(_gemm_kernel, grid,
           (a, b, c, bias if bias is not None else c, pre, row_sum if row_sum is not None else c, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)),
           dict(HAS_BIAS=bias is not None, GELU=gelu, SAVE_PRE=pre_dtype is not None,
                ROW_SUM=row_sum is not None, PRECISION=precision, **cfg),
           num_warps=warps, num_stages=stages)
    return (c, pre) if pre_dtype is not None else c


def _bias_grad(dy: torch.Tensor, pre: torch.Tensor | None, dpre_dtype: torch.dtype,
               db_dtype: torch.dtype | None):
    """(db, dpre): column sums of d(pre) cast to db_dtype (None: not wanted), and d(pre)
    itself, computed as dy * gelu'(pre) when ``pre`` is given, else dy."""
    M, N = dy.shape
    bm, bn = BIAS_GRAD_BLOCK["BLOCK_M"], BIAS_GRAD_BLOCK["BLOCK_N"]
    if pre is None and db_dtype is None:
        return None, dy
    want = db_dtype is not None
    part = torch.empty((cdiv(M, bm), N) if want else (1,), device=dy.device, dtype=torch.float32)
    dpre = torch.empty_like(dy, dtype=dpre_dtype) if pre is not None else dy
    launch(_bias_grad_kernel, (cdiv(M, bm), cdiv(N, bn)),
           (dy, pre if pre is not None else dy, dpre, part, M, N),
           dict(GELU=pre is not None, PARTIALS=want, BLOCK_M=bm, BLOCK_N=bn), num_warps=BIAS_GRAD_BLOCK["num_warps"],
           num_stages=1)
    db = None
    if db_dtype is not None:
        db = sum_partials(part, torch.empty((N,), device=dy.device, dtype=db_dtype))
    return db, dpre


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _linear_backward(needs, x2, w, dpre, db_dtype=None):
    """dx = dpre @ w, dw = dpre^T @ x, each only when needed; with db_dtype also
    db = dpre.sum(0), from the dw GEMM's tiles when dw is computed (no extra launch)."""
    dx = _gemm(dpre, w, out_dtype=x2.dtype) if needs[0] else None
    dw = db = None
    if db_dtype is not None:
        db = torch.empty((dpre.shape[1],), device=dpre.device, dtype=db_dtype)
    if needs[1]:
        dw = _gemm(dpre.t(), x2, out_dtype=w.dtype, row_sum=db)
    elif db is not None:
        db, _ = _bias_grad(dpre, None, dpre.dtype, db_dtype)
    return dx, dw, db


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        x2 = _flatten(x).contiguous()
        y = _gemm(x2, w.t(), out_dtype=x.dtype, bias=b)
        ctx.save_for_backward(x2, w)
        ctx.x_shape = x.shape
        ctx.has_bias = b is not None
        ctx.b_dtype = b.dtype if b is not None else None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dy2 = _flatten(dy).contiguous()
        want_db = ctx.has_bias and ctx.needs_input_grad[2]
        dx, dw, db = _linear_backward(ctx.needs_input_grad, x2, w, dy2, ctx.b_dtype if want_db else None)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db


class _LinearGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        x2 = _flatten(x).contiguous()
        y, pre = _gemm(x2, w.t(), out_dtype=x.dtype, bias=b, gelu=True, pre_dtype=x.dtype)
        ctx.save_for_backward(x2, w, pre)
        ctx.x_shape = x.shape
        ctx.has_bias = b is not None
        ctx.b_dtype = b.dtype if b is not None else None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w, pre = ctx.saved_tensors
        dy2 = _flatten(dy).contiguous()
        want_db = ctx.has_bias and ctx.needs_input_grad[2]
        fold = want_db and ctx.needs_input_grad[1]  # db comes from the dw GEMM
        db, dpre = _bias_grad(dy2, pre, x2.dtype, ctx.b_dtype if want_db and not fold else None)
        dx, dw, db2 = _linear_backward(ctx.needs_input_grad, x2, w, dpre, ctx.b_dtype if fold else None)
        db = db2 if fold else db
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db


def _bwd_programs(M: int, rows: int, device: torch.device) -> int:
    # A few programs per SM hide latency; more only grow the partial-sum buffer.
    return max(1, min(cdiv(M, rows), 4 * device_sms(device)))


class _LinearDropoutResLNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, residual, ln_w, ln_b, eps, p, seed, training):
        x2 = _flatten(x).contiguous()
        M, N = x2.shape[0], w.shape[0]
        res2 = _flatten(residual).contiguous()
        assert res2.shape == (M, N), (residual.shape, (M, N))
        # fp32 pre: no rounding before dropout and the residual add, as in a single-pass
        # kernel; the cost is one fp32 round trip of an (M, N) tensor.
        pre = _gemm(x2, w.t(), out_dtype=torch.float32, bias=b)
        dropout = bool(training) and p > 0.0
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
        z = torch.empty((M, N), device=x.device, dtype=x.dtype)
        mean = torch.empty((M,), device=x.device, dtype=torch.float32)
        rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
        cfg = row_config(N)
        if M > 0:
            launch(_dropout_res_ln_fwd_kernel, (cdiv(M, cfg["ROWS"]),),
                   (pre, res2, ln_w, ln_b, out, z, mean, rstd, seed, M, N, float(p), scale, float(eps)),
                   dict(HAS_DROPOUT=dropout, SEED_PTR=isinstance(seed, torch.Tensor), ROWS=cfg["ROWS"],
                        BLOCK_N=cfg["BLOCK_N"]),
                   num_warps=cfg["num_warps"], num_stages=1)
        ctx.save_for_backward(x2, w, z, mean, rstd, ln_w)
        ctx.meta = (x.shape, residual.shape, b is not None, b.dtype if b is not None else None,
                    ln_b.dtype, dropout, float(p), scale, seed)
        return out.view(residual.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, w, z, mean, rstd, ln_w = ctx.saved_tensors
        x_shape, res_shape, has_bias, b_dtype, lnb_dtype, dropout, p, scale, seed = ctx.meta
        M, N = z.shape
        dout2 = _flatten(dout).contiguous()
        cfg = row_config(N, backward=True)
        progs = _bwd_programs(M, cfg["ROWS"], z.device)
        rows_per_prog = cdiv(cdiv(M, cfg["ROWS"]), progs) * cfg["ROWS"]
        dres = torch.empty_like(z)
        dpre = torch.empty_like(z)
        part = (torch.empty if M > 0 else torch.zeros)((3, progs, N), device=z.device, dtype=torch.float32)
        if M > 0:
            launch(_dropout_res_ln_bwd_kernel, (progs,),
                   (dout2, z, mean, rstd, ln_w, dres, dpre, part, seed, M, N, p, scale, rows_per_prog, progs),
                   dict(HAS_DROPOUT=dropout, SEED_PTR=isinstance(seed, torch.Tensor), ROWS=cfg["ROWS"],
                        BLOCK_N=cfg["BLOCK_N"]),
                   num_warps=cfg["num_warps"], num_stages=1)
        needs = ctx.needs_input_grad

        dx, dw, _ = _linear_backward(needs[:3], x2, w, dpre)
        if dx is not None:
            dx = dx.view(x_shape)
        # the three column sums (LN weight, LN bias, linear bias) in one launch; _check made
        # their dtypes equal
        sums = sum_partial_groups(part, torch.empty((3, N), device=z.device, dtype=ln_w.dtype))
        db = sums[2] if has_bias and needs[2] else None
        dlnw = sums[0] if needs[4] else None
        dlnb = sums[1] if needs[5] else None
        return dx, dw, db, dres.view(res_shape) if needs[3] else None, dlnw, dlnb, None, None, None, None


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def _check(x: torch.Tensor, w: torch.Tensor, *others: torch.Tensor | None) -> None:
    # The kernels read every operand as x's dtype would be read; nn.Linear raises on a
    # mismatch too, so do the same rather than compute in a surprising precision.
    for t in (w, *others):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: {x.dtype} input with a {t.dtype} parameter")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input width {x.shape[-1]} != weight in_features {w.shape[1]}")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w^T + b with the bias in the GEMM epilogue; x (..., K), w (N, K)."""
    _check(x, w, b)
    return _LinearFn.apply(x, w, b)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = gelu_erf(x @ w^T + b), bias and exact GELU in the GEMM epilogue."""
    _check(x, w, b)
    return _LinearGeluFn.apply(x, w, b)


def linear_dropout_residual_layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                                      residual: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                      eps: float = 1e-12, dropout_p: float = 0.0, seed: int | None = None,
                                      training: bool = False) -> torch.Tensor:
    """LayerNorm(dropout(x @ w^T + b) + residual) (BERT/Q-Former output block).

    Dropout is active only when ``training`` and ``dropout_p > 0``; its keep mask is
    ``dropout_mask(seed, M, N, dropout_p)`` over the flattened (M, N) output. ``seed``
    (0 <= seed < 2**31) defaults to one drawn from torch's generator."""
    _check(x, w, b, residual, ln_weight, ln_bias)
    if seed is None:
        seed = dropout_seed(x.device) if (training and dropout_p > 0.0) else 0
    if not isinstance(seed, torch.Tensor):
        if not 0 <= int(seed) < 2 ** 31:
            raise ValueError("seed must be in [0, 2**31)")
        seed = int(seed)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError("dropout_p must be in [0, 1]")
    return _LinearDropoutResLNFn.apply(x, w, b, residual, ln_weight, ln_bias, float(eps), float(dropout_p),
                                       seed, bool(training))


def dropout_mask(seed: int, M: int, N: int, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The (M, N) bool keep mask of linear_dropout_residual_layernorm for this seed and p."""
    device = torch.device(device) if device is not None else torch.device("cuda" if not INTERPRET else "cpu")
    out = torch.empty((M, N), device=device, dtype=torch.int8)
    if M * N == 0:
        return out.bool()
    block = 1024
    ptr = isinstance(seed, torch.Tensor)
    launch(_dropout_mask_kernel, (cdiv(M * N, block),), (out, seed if ptr else int(seed), M * N, float(p)),
           dict(SEED_PTR=ptr, BLOCK=block), num_warps=4, num_stages=1)
    return out.bool()

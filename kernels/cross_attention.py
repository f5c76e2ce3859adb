"""Attention for few queries over many keys (Q-Former cross- and self-attention).

    out = attention(q, k, v, key_mask=None, dropout_p=0.0, seed=None, training=False, scale=None)

Release shapes: 64 video queries over 2048 frame-query keys, 8 audio queries over 3 clips,
64 over 64 in the self-attention; 12 heads x 64.

Layout. q, k, v are (B, H, L, D) tensors of any strides whose last dimension is unit-stride,
so the projections' (B, L, H*D) outputs go in as `x.view(B, L, H, D).transpose(1, 2)` without a
copy. The output is (B, H, Lq, D) laid out in memory as (B, Lq, H, D): `out.transpose(1, 2)
.flatten(2)` is the (B, Lq, H*D) context of the reference for free. D <= 128.

Semantics (those of fastground.model.qformer.QFormerSelfAttention):
    probs = softmax(q k^T * scale + bias),  scale = 1/sqrt(D) by default
    out   = dropout(probs) @ v
bias comes from key_mask (B, Lk), nonzero = attend. The reference adds finfo.min to masked
scores; in floating point that replaces the score by one constant, so a partly masked row puts
exactly zero weight on its masked keys and a fully masked row (every key of that batch entry
masked) gets the uniform average of all Lk values. The kernel reproduces both: a masked score
is replaced by -1e30 when the batch entry has an unmasked key, by 0 when it has none (then all
scores are equal). Gradients flow to q and k through masked scores as in the reference (zero
where the probability is zero, the softmax Jacobian of the uniform row for a fully masked one).
Masked keys of an entry that has unmasked ones are never loaded (K and V rows read as zero), so
a NaN or inf stored there changes neither the output nor any gradient, forward or backward;
their dK and dV are exactly zero. (A fully masked entry averages all its values, as the release
does, so there every key is used.)

Dropout keeps a probability with chance 1 - p and scales kept ones by 1/(1 - p); the keep bit
of element (b, h, i, j) is `tl.rand(philox_key(seed), ((b*H + h) << 32) + i*Lk + j) >= p`
(Philox-4x32-10: one counter per element, no two elements share one), regenerated in the
backward, so no mask is stored; `attention_dropout_mask` returns the same bits for a
reference computation.

Algorithm (FlashAttention-2 style, fp32 softmax statistics, base-2 exponentials):
  forward   one program per (query block, b*h, key split); online softmax over its keys, the
            accumulator kept normalised (a convex combination of V rows), so it stays finite
            wherever torch's normalised probabilities @ V do, even at bf16's largest values. When
            the query blocks alone cannot fill the GPU (B*H = 96 programs at B=8, 12 at B=1)
            the keys are split and a combine kernel merges the fp32 partials by their
            log-sum-exp. Only the row LSE is kept for the backward.
  backward  delta = rowsum(dO * O) (inside the main kernel when all queries fit one block, a
            separate launch otherwise); then one program per (chunk of key blocks, b*h)
            recomputes P from the LSE, writes dK and dV of its key blocks, and accumulates dQ
            for its chunk in fp32; chunks are summed in a fixed order (no atomics, so the
            gradients are deterministic). With Lq <= BLOCK_M (all release shapes) q, dO, LSE and
            delta are loaded once per program and dQ stays in registers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import functools
from typing import NamedTuple

from .partials import dense_like, sum_partials
from .runtime import cdiv, device_sms, dot_precision, dropout_seed, kernel_seed, launch, philox_key, pow2  # noqa: F401

LOG2E = 1.4426950408889634
MASKED = -1.0e30  # finite: exp2(MASKED - m) == 0, and MASKED - MASKED == 0 never makes NaN


# --------------------------------------------------------------------------- kernels
@triton.jit
def _keep_bits(seed, bh, offs_m, offs_n, Lk, p_drop):
    # = tl.rand(seed, (bh << 32) + i*Lk + j), spelled through tl.philox so the 64-bit counter is
    # never built per element: its high word is this program's scalar bh, its low word fits
    # 32 bits (Lq*Lk < 2^31). A 64-bit offset tile costs enough registers to spill on sm_80.
    c0 = (offs_m[:, None] * Lk + offs_n[None, :]).to(tl.uint32, bitcast=True)
    c1 = tl.full(c0.shape, 0, tl.uint32) + bh.to(tl.uint32)
    zero = tl.full(c0.shape, 0, tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.random.uint_to_uniform_float(r) >= p_drop


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(keep_ptr, seed, H, Lq, Lk, p_drop, SEED_PTR: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    if SEED_PTR:  # the key lives on the device (runtime.dropout_seed under graph capture)
        seed = tl.load(seed)
    keep = _keep_bits(seed, bh, offs_m, offs_n, Lk, p_drop)
    ptrs = keep_ptr + (bh.to(tl.int64) * Lq + offs_m[:, None]) * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, fill_ptr, o_ptr, lse_ptr,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                     s_split_o, s_split_l, stride_mask,
                     H, Lq, Lk, D, keys_per_split, qk_scale, seed, p_drop, keep_scale,
                     HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    if SEED_PTR:
        seed = tl.load(seed)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + h * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h * svh
    if HAS_MASK:
        fill = tl.load(fill_ptr + b)
        # fill 0: every key of this entry is masked (all read, all scores 0: uniform average)
        score_scale = tl.where(fill != 0.0, 1.0, 0.0)
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, Lk)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        use = n_ok
        if HAS_MASK:
            km = tl.load(mask_ptr + b * stride_mask + offs_n, mask=n_ok, other=0) != 0
            use = n_ok & km
        kv_ok = use[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            s = tl.where(km[None, :], s * score_scale, fill)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # Each split starts with an in-range key, so m_new is finite from the first block.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_new = l_i * alpha + tl.sum(p, axis=1)
        r = 1.0 / l_new
        if DROPOUT:
            keep = _keep_bits(seed, bh, offs_m, offs_n, Lk, p_drop)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        # Normalised as it goes: old weights and new ones sum to at most 1, so |acc| never
        # exceeds max |v| (an unnormalised sum of up to Lk values overflows near bf16's max).
        acc = acc * (alpha * l_i * r)[:, None]
        acc = tl.dot((p * r[:, None]).to(v.dtype), v, acc, input_precision=PRECISION)
        l_i = l_new
        m_i = m_new
    if DROPOUT:
        acc = acc * keep_scale
    out = acc
    lse = m_i + tl.log2(l_i)
    o_off = split.to(tl.int64) * s_split_o + b.to(tl.int64) * sob + h * soh
    tl.store(o_ptr + o_off + offs_m[:, None] * som + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + split.to(tl.int64) * s_split_l + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_combine_kernel(po_ptr, pl_ptr, o_ptr, lse_ptr, n_splits,
                         s_split_o, s_split_l, spb, sph, spm, sob, soh, som, H, Lq, D,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Merge per-split (normalised output, lse) pairs: weights 2^(lse_s - lse).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    ok = m_ok[:, None] & (offs_d[None, :] < D)
    l_base = pl_ptr + bh.to(tl.int64) * Lq + offs_m
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(l_base + s * s_split_l, mask=m_ok, other=0.0))
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, n_splits):
        total += tl.exp2(tl.load(l_base + s * s_split_l, mask=m_ok, other=0.0) - m)
    # Weights normalised before the sum: a convex combination of the splits' outputs.
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_base = po_ptr + b.to(tl.int64) * spb + h * sph + offs_m[:, None] * spm + offs_d[None, :]
    for s in range(0, n_splits):
        w = tl.exp2(tl.load(l_base + s * s_split_l, mask=m_ok, other=0.0) - m) / total
        acc += w[:, None] * tl.load(p_base + s * s_split_o, mask=ok, other=0.0).to(tl.float32)
    out = acc
    tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=ok)
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, m + tl.log2(total), mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, sob, soh, som, sdb, sdh, sdm, H, Lq, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    ok = m_ok[:, None] & (offs_d[None, :] < D)
    o = tl.load(o_ptr + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b.to(tl.int64) * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, o_ptr, mask_ptr, fill_ptr,
                     dq_ptr, dk_ptr, dv_ptr,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sob, soh, som,
                     sdq_split, sdqb, sdqh, sdqm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, stride_mask,
                     H, Lq, Lk, D, blocks_per_chunk, qk_scale, sm_scale, seed, p_drop, keep_scale,
                     HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, SINGLE_Q: tl.constexpr,
                     DQ_DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    if SEED_PTR:
        seed = tl.load(seed)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = q_ptr + b64 * sqb + h * sqh
    do_base = do_ptr + b64 * sdob + h * sdoh
    row_base = bh.to(tl.int64) * Lq
    dq_base = dq_ptr + chunk.to(tl.int64) * sdq_split + b64 * sdqb + h * sdqh
    if HAS_MASK:
        fill = tl.load(fill_ptr + b)
        score_scale = tl.where(fill != 0.0, 1.0, 0.0)
    offs_m = tl.arange(0, BLOCK_M)
    if SINGLE_Q:
        # Every key block of the chunk meets the same (only) query block: load it once.
        m_ok = offs_m < Lq
        qd_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=qd_ok, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=qd_ok, other=0.0)
        lse = tl.load(lse_ptr + row_base + offs_m, mask=m_ok, other=0.0)
        # delta = rowsum(dO * O) here, from the rows this program holds anyway: no launch
        o = tl.load(o_ptr + b64 * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=qd_ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SINGLE_Q:
        n_qblocks = 1
    else:
        n_qblocks = tl.cdiv(Lq, BLOCK_M)
    n_blocks = tl.cdiv(Lk, BLOCK_N)
    kb_start = chunk * blocks_per_chunk
    kb_end = tl.minimum(kb_start + blocks_per_chunk, n_blocks)
    for kb in range(kb_start, kb_end):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        use = n_ok
        if HAS_MASK:  # masked keys are never loaded: their dK, dV come out exactly zero
            km = tl.load(mask_ptr + b * stride_mask + offs_n, mask=n_ok, other=0) != 0
            use = n_ok & km
        load_ok = use[:, None] & d_ok[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b64 * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :],
                    mask=load_ok, other=0.0)
        v = tl.load(v_ptr + b64 * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :],
                    mask=load_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for qb in range(0, n_qblocks):
            if not SINGLE_Q:
                offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
                m_ok = offs_m < Lq
                qd_ok = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=qd_ok, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=qd_ok, other=0.0)
                lse = tl.load(lse_ptr + row_base + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(delta_ptr + row_base + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if HAS_MASK:
                s = tl.where(km[None, :], s * score_scale, fill)
            # Padded query rows have q = dO = delta = 0, so whatever p they get, their
            # contributions below vanish.
            p = tl.exp2(tl.where(n_ok[None, :], s, float("-inf")) - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if DROPOUT:
                keep = _keep_bits(seed, bh, offs_m, offs_n, Lk, p_drop)
                z = tl.where(keep, p * keep_scale, 0.0)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            else:
                z = p
            dv = tl.dot(tl.trans(z.to(do.dtype)), do, dv, input_precision=PRECISION)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
            if SINGLE_Q:
                dq = tl.dot(ds, k, dq, input_precision=PRECISION)
            else:
                # This chunk's own fp32 slice: read-modify-write by one program only.
                dq_ptrs = dq_base + offs_m[:, None] * sdqm + offs_d[None, :]
                part = tl.dot(ds, k, tl.load(dq_ptrs, mask=qd_ok, other=0.0), input_precision=PRECISION)
                tl.store(dq_ptrs, part, mask=qd_ok)
        tl.store(dk_ptr + b64 * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
                 (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(dv_ptr + b64 * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)
    if SINGLE_Q:
        dq_ptrs = dq_base + offs_m[:, None] * sdqm + offs_d[None, :]
        if DQ_DIRECT:
            tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=qd_ok)
        else:
            tl.store(dq_ptrs, dq, mask=qd_ok)


# --------------------------------------------------------------------------- planning
_p2 = pow2


@functools.lru_cache(maxsize=256)
def fwd_config(BH: int, Lq: int, Lk: int, D: int, dtype: torch.dtype, sms: int, dropout: bool,
               precision: str = "ieee") -> dict:
    """Forward tiles and key splits.

    BLOCK_M = pow2(Lq) in [16, 64]: the 64 video / self-attention queries are one block, the
    8 audio queries one block of 16 (tl.dot's minimum). BLOCK_N = pow2(Lk) capped at
      16-bit: 128 without dropout, 64 with (the Philox state of a 64x128 tile spills on sm_80),
              4 warps, 3 stages;
      fp32:   32, 2 stages, 8 warps for IEEE FMA dots (they hold whole operand rows in
              registers), 4 for TF32 tensor-core dots.
    Splits: when query blocks x B*H programs are fewer than the SMs, the keys are cut into up
    to ceil(2 * SMs / programs) splits of >= 2 key blocks each (B=8 video on an H100: 2-3
    splits; B=1: 8).
    All choices are free of register spills at the release shapes (tests/test_kernels_aot.py).
    """
    if dtype == torch.float32:
        cap_n, warps, stages = 32, (8 if precision == "ieee" else 4), 2
    else:
        cap_n, warps, stages = (64 if dropout else 128), 4, 3
    cfg = dict(BLOCK_M=_p2(Lq, 16, 64), BLOCK_N=_p2(Lk, 16, cap_n), BLOCK_D=_p2(D, 16, 128),
               num_warps=warps, num_stages=stages)
    programs = max(1, cdiv(Lq, cfg["BLOCK_M"]) * BH)
    n_blocks = cdiv(Lk, cfg["BLOCK_N"])
    splits = 1
    if programs < sms:
        splits = max(1, min(cdiv(2 * sms, programs), n_blocks // 2))
    cfg["keys_per_split"] = cdiv(n_blocks, splits) * cfg["BLOCK_N"]
    return cfg


@functools.lru_cache(maxsize=256)
def bwd_config(BH: int, Lq: int, Lk: int, D: int, dtype: torch.dtype, sms: int, precision: str = "ieee") -> dict:
    """Backward tiles and key chunks.

    BLOCK_M = pow2(Lq) in [16, 64] so the release's 64 / 8 queries are one block (q, dO, dQ
    then stay in registers for the whole program). BLOCK_N = pow2(Lk) capped at 32 for 16-bit
    (4 warps, 3 stages) and 16 for fp32 (2 stages, 8 warps IEEE / 4 TF32): with q, dO, dQ, dK, dV and the
    P/dP tiles live at once, larger key blocks spill on sm_80. Each program walks
    `blocks_per_chunk` key blocks. The chunks per head are the most that keep all programs
    within one wave of 2 resident programs per SM (B=8 on an H100: 96 heads x 2 chunks = 192
    <= 264), never a partial second wave (3 chunks would be 288 programs: 264 plus a tail of
    24); with B*H beyond a wave, one chunk per head. Fewer chunks mean fewer dQ partials.
    """
    if dtype == torch.float32:
        cap_n, warps, stages = 16, (8 if precision == "ieee" else 4), 2
    else:
        cap_n, warps, stages = 32, 4, 3
    # More than 64 queries: q, dO and the dQ partial are reloaded per query block, and a
    # 64-row block of them no longer fits registers next to the key tiles (spills on sm_80).
    block_m = _p2(Lq, 16, 64) if Lq <= 64 else (16 if dtype == torch.float32 else 32)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=_p2(Lk, 16, cap_n), BLOCK_D=_p2(D, 16, 128),
               num_warps=warps, num_stages=stages)
    n_blocks = cdiv(Lk, cfg["BLOCK_N"])
    chunks = max(1, min(n_blocks, (2 * sms) // BH))
    cfg["blocks_per_chunk"] = cdiv(n_blocks, chunks)
    return cfg


def _strides4(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class KeyMask(NamedTuple):
    """A key mask as the kernels read it (`key_mask_plan`): `keys` (B, Lk) int8, 1 = key is
    read, and `fill` (B,) fp32, the score of a masked key: -1e30, or 0 for an entry whose keys
    are all masked (then every key is read and every score is 0: the uniform average)."""

    keys: torch.Tensor
    fill: torch.Tensor


def key_mask_plan(key_mask: torch.Tensor) -> KeyMask:
    """(B, Lk) mask, nonzero = attend -> KeyMask. Built once per batch, it serves every
    attention over those keys and, as a row mask, the K/V projection (kv_proj_pe)."""
    keep = key_mask.ne(0)
    anyk = keep.any(dim=1)
    fill = torch.where(anyk, MASKED, 0.0).to(torch.float32)
    return KeyMask((keep | ~anyk[:, None]).to(torch.int8).contiguous(), fill)


def _mask_args(key_mask, B, Lk, device):
    if key_mask is None:
        return None, None
    if not isinstance(key_mask, KeyMask):
        key_mask = key_mask_plan(key_mask)
    if key_mask.keys.shape != (B, Lk):
        raise ValueError(f"attention: key_mask must be (B, Lk) = {(B, Lk)}, got {tuple(key_mask.keys.shape)}")
    return key_mask.keys, key_mask.fill


# --------------------------------------------------------------------------- launchers
def _attn_forward(q, k, v, mask8, fill, scale, p_drop, seed, cfg=None):
    # seed: the Philox key, an int or (graph capture) a device tensor read by the kernel
    seed_ptr = isinstance(seed, torch.Tensor)
    seed_arg = seed if seed_ptr else int(seed)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    precision = dot_precision(q.dtype)
    cfg = dict(cfg or fwd_config(B * H, Lq, Lk, D, q.dtype, device_sms(q.device), p_drop > 0.0, precision))
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    kps = cfg.pop("keys_per_split")
    splits = cdiv(Lk, kps)
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B * H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if splits == 1:
        o_t, l_t = out, lse
    else:
        o_t = dense_like(out, splits)
        l_t = torch.empty((splits, B * H, Lq), dtype=torch.float32, device=q.device)
    dropout = p_drop > 0.0
    has_mask = mask8 is not None
    launch(_attn_fwd_kernel, (cdiv(Lq, cfg["BLOCK_M"]), B * H, splits),
           (q, k, v, mask8 if has_mask else q, fill if has_mask else q, o_t, l_t,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(o_t[0] if splits > 1 else o_t),
            o_t.stride(0) if splits > 1 else 0, l_t.stride(0) if splits > 1 else 0,
            mask8.stride(0) if has_mask else 0,
            H, Lq, Lk, D, kps, float(scale * LOG2E), seed_arg, float(p_drop),
            float(1.0 / (1.0 - p_drop)) if dropout else 1.0),
           dict(HAS_MASK=has_mask, DROPOUT=dropout, SEED_PTR=seed_ptr, PRECISION=precision, **cfg), nw, ns)
    if splits > 1:
        launch(_attn_combine_kernel, (cdiv(Lq, cfg["BLOCK_M"]), B * H),
               (o_t, l_t, out, lse, splits, o_t.stride(0), l_t.stride(0), *_strides4(o_t[0]),
                *_strides4(out), H, Lq, D),
               dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"]), 4, 1)
    return out, lse


def _attn_backward(do, q, k, v, out, lse, mask8, fill, scale, p_drop, seed, cfg=None):
    # seed: the Philox key, an int or (graph capture) a device tensor read by the kernel
    seed_ptr = isinstance(seed, torch.Tensor)
    seed_arg = seed if seed_ptr else int(seed)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    precision = dot_precision(q.dtype)
    cfg = dict(cfg or bwd_config(B * H, Lq, Lk, D, q.dtype, device_sms(q.device), precision))
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    bpc = cfg.pop("blocks_per_chunk")
    chunks = cdiv(cdiv(Lk, cfg["BLOCK_N"]), bpc)
    single_q = Lq <= cfg["BLOCK_M"]
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if single_q:
        delta = lse  # unused: the kernel computes delta itself
    else:
        delta = torch.empty((B * H, Lq), dtype=torch.float32, device=q.device)
        launch(_attn_bwd_delta_kernel, (cdiv(Lq, cfg["BLOCK_M"]), B * H),
               (out, do, delta, *_strides4(out), *_strides4(do), H, Lq, D),
               dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"]), 4, 1)
    # (B, L, H, D) memory, the projections' layout: the gradients flow back through the
    # head-split views without a contiguity copy.
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    dk = torch.empty((B, Lk, H, D), dtype=k.dtype, device=k.device).transpose(1, 2)
    dv = torch.empty((B, Lk, H, D), dtype=v.dtype, device=v.device).transpose(1, 2)
    dq_direct = single_q and chunks == 1
    dq_t = dq if dq_direct else dense_like(dq, chunks, zero=not single_q)
    dropout = p_drop > 0.0
    has_mask = mask8 is not None
    launch(_attn_bwd_kernel, (chunks, B * H),
           (q, k, v, do, lse, delta, out, mask8 if has_mask else q, fill if has_mask else q,
            dq_t, dk, dv,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do), *_strides4(out),
            0 if dq_direct else dq_t.stride(0), *_strides4(dq_t if dq_direct else dq_t[0]),
            *_strides4(dk), *_strides4(dv), mask8.stride(0) if has_mask else 0,
            H, Lq, Lk, D, bpc, float(scale * LOG2E), float(scale), seed_arg, float(p_drop),
            float(1.0 / (1.0 - p_drop)) if dropout else 1.0),
           dict(HAS_MASK=has_mask, DROPOUT=dropout, SEED_PTR=seed_ptr, SINGLE_Q=single_q, DQ_DIRECT=dq_direct,
                PRECISION=precision, **cfg), nw, ns)
    if not dq_direct:
        sum_partials(dq_t, dq, scale)
    return dq, dk, dv


# --------------------------------------------------------------------------- autograd
class CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask8, fill, scale, p_drop, seed):
        out, lse = _attn_forward(q, k, v, mask8, fill, scale, p_drop, seed)
        ctx.save_for_backward(q, k, v, out, lse, mask8, fill)
        ctx.consts = (scale, p_drop, seed)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, mask8, fill = ctx.saved_tensors
        scale, p_drop, seed = ctx.consts
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = _attn_backward(do, q, k, v, out, lse, mask8, fill, scale, p_drop, seed)
        return dq, dk, dv, None, None, None, None, None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, seed: int | None = None, training: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + key-mask bias) (with dropout when training) @ v.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_mask: (B, Lk), nonzero = attend. Dropout acts
    only when training and dropout_p > 0; seed None draws one from torch's CPU generator (so
    torch.manual_seed makes runs repeatable). Returns (B, H, Lq, D), memory (B, Lq, H, D).
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if D > 128 or Lk == 0 or Lq * Lk >= 2**31:
        raise ValueError(f"attention: head dim {D} > 128, no keys, or Lq*Lk = {Lq * Lk} >= 2^31 "
                         "(the per-head dropout counter is 32-bit)")
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if p > 0.0 and seed is None:
        seed = dropout_seed(q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask8, fill = _mask_args(key_mask, B, Lk, q.device)
    return CrossAttention.apply(_unit_last(q), _unit_last(k), _unit_last(v), mask8, fill, scale, p,
                                kernel_seed(0 if seed is None else seed)[0])


def attention_dropout_mask(seed: int, B: int, H: int, Lq: int, Lk: int, p: float,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (B, H, Lq, Lk), bool, that `attention(..., dropout_p=p, seed=seed,
    training=True)` applies: reference = softmax(...) * mask / (1 - p) @ v."""
    keep = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=device)
    key, seed_ptr = kernel_seed(seed)
    bm, bn = _p2(Lq, 16, 32), _p2(Lk, 16, 64)
    launch(_dropout_mask_kernel, (cdiv(Lq, bm), cdiv(Lk, bn), B * H),
           (keep, key, H, Lq, Lk, float(p)), dict(SEED_PTR=seed_ptr, BLOCK_M=bm, BLOCK_N=bn), 4, 1)
    return keep.view(torch.bool)

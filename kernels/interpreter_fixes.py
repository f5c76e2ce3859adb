"""bf16 fixes for Triton's CPU interpreter (TRITON_INTERPRET=1), applied on import of the
kernel modules and only when interpreting.

The interpreter of Triton 3.x keeps bf16 tensors as raw uint16 and
  * multiplies those raw integers in tl.dot (bf16 dots return garbage), and
  * truncates on fp32 -> bf16 casts, where the GPU (and torch) round to nearest even.
Both would make the CPU tests measure the interpreter instead of the kernels. The fix upcasts
bf16 dot operands exactly to fp32 (a bf16 x bf16 product is exact in fp32, so this is what an
MMA with fp32 accumulation computes) and rounds fp32 -> bf16 to nearest even. Nothing changes
on GPU: compiled kernels never reach this code.
"""
from __future__ import annotations

import numpy as np


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (np.asarray(u16).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f32: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if np.any(nan):
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded


def apply(interpreting: bool) -> None:
    if not interpreting:
        return
    import triton.language as tl
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    if getattr(builder, "_fastground_bf16_fix", False):
        return
    cast_impl, create_dot = builder.cast_impl, builder.create_dot

    def fixed_cast(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == tl.bfloat16 and d == tl.float32:
            return ti.TensorHandle(_bf16_to_f32(src.data), tl.float32)
        if s == tl.float32 and d == tl.bfloat16:
            return ti.TensorHandle(_f32_to_bf16(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def fixed_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = ti.TensorHandle(_bf16_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = ti.TensorHandle(_bf16_to_f32(b.data), tl.float32)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl = fixed_cast
    builder.create_dot = fixed_dot
    builder._fastground_bf16_fix = True


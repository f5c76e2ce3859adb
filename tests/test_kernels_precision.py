"""The fp32 tolerance is tight enough to catch TF32.

tests/tolerances.py holds fp32 tolerances set from the measured error of the fast path
(outputs <= 4.2e-7, gradients <= 1.9e-6 relative, every fp32 equivalence test of the kernel and
fast-path suites) with a stated margin. TF32 products (10-bit mantissas) are ~100x worse; the
interpreter ignores input_precision, so a TF32 result is emulated here by rounding the operands
of every product to TF32 and the test checks the table rejects it while the kernels pass.
(tests/test_kernels_runtime.py checks the launches themselves ask for exact fp32.)"""
from __future__ import annotations

import math

import pytest
import torch

from fastground.kernels.cross_attention import attention
from fastground.kernels.fused_linear import linear
from fastground.kernels.kv_proj_pe import kv_proj_pe
from tolerances import REL_TOL, REL_TOL_GRAD, assert_close, rel_err

FP32 = torch.float32


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to TF32 (10 explicit mantissa bits), nearest even, as tensor cores read them."""
    u = t.detach().to(FP32).contiguous().view(torch.int32).to(torch.int64)
    u = (u + 0x0FFF + ((u >> 13) & 1)) & ~0x1FFF
    return u.to(torch.int32).view(FP32).to(t.dtype)


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    x, w, b = r(96, 256), r(64, 256) / 16, r(64)
    yield ("linear", lambda: linear(x, w, b), lambda t: (t(x).double() @ t(w).double().T + b.double()))

    q, k, v = r(2, 2, 16, 32), r(2, 2, 40, 32), r(2, 2, 40, 32)

    def attn_ref(t):
        s = t(q).double() @ t(k).double().transpose(-1, -2) / math.sqrt(32)
        p = s.softmax(-1)
        return t(p.float()).double() @ t(v).double()

    yield ("attention", lambda: attention(q, k, v), attn_ref)

    xs, pe, wk = r(2, 24, 48), r(3, 48), r(32, 48) / 7
    pos = (torch.arange(24) // 8) % 3
    yield ("kv_proj_pe", lambda: kv_proj_pe(xs, pe, 8, 3, wk, None, wk, None)[0],
           lambda t: t((xs + pe[pos]).float()).double() @ t(wk).double().T)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_fp32_tolerance_passes_the_kernels_and_rejects_tf32(case):
    name, fast, reference = case
    exact = reference(lambda t: t)
    tf32 = reference(to_tf32)
    err_fast, err_tf32 = rel_err(fast(), exact), rel_err(tf32, exact)
    print(f"{name}: kernel {err_fast:.2e}, emulated TF32 {err_tf32:.2e}, tolerance {REL_TOL[FP32]:g}")
    assert err_fast <= REL_TOL[FP32] / 5  # the measured margin holds
    assert err_tf32 >= 3 * REL_TOL_GRAD[FP32]  # TF32 sits well outside even the gradient tolerance
    with pytest.raises(AssertionError):
        assert_close(tf32, exact, FP32, what=f"{name} in TF32")
    with pytest.raises(AssertionError):
        assert_close(tf32, exact, FP32, grad=True, what=f"{name} in TF32")


def test_tf32_rounding_emulation():
    x = torch.tensor([1.0, 1.0 + 2 ** -10, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, -3.0 - 2 ** -12, 1e-30])
    assert to_tf32(x).tolist() == pytest.approx([1.0, 1.0 + 2 ** -10, 1.0, 1.0 + 2 ** -9, -3.0, to_tf32(x)[5].item()])
    assert ((to_tf32(torch.randn(1000)).view(torch.int32) & 0x1FFF) == 0).all()

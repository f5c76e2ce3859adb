"""Relative-error tolerances ||out - ref|| / ||ref|| per dtype, shared by every
equivalence test. Kept as data so a change of tolerance is one visible diff."""
import torch

# fp32: the kernels multiply in exact fp32 (kernels/runtime.py). Measured on every fp32
# equivalence test of the kernel and fast-path suites: outputs <= 4.2e-7, gradients <= 1.9e-6.
# The tolerances keep a margin of >= 5x over that and sit >= 10x below an emulated TF32 result
# (~1-3e-4, tests/test_kernels_precision.py), so fp32 silently running in TF32 fails.
REL_TOL = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
}
# Gradients accumulate more rounding (sums over thousands of rows in bf16).
REL_TOL_GRAD = {
    torch.float32: 2e-5,
    torch.bfloat16: 2e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    ref = ref.detach().double()
    denom = ref.norm().item()
    if not torch.isfinite(out).all():
        return float("inf")
    return (out - ref).norm().item() / max(denom, 1e-30)


def assert_close(out, ref, dtype, grad=False, what=""):
    tol = (REL_TOL_GRAD if grad else REL_TOL)[dtype]
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"

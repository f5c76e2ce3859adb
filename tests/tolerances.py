"""Relative-error tolerances ||out - ref|| / ||ref|| per dtype, shared by every
equivalence test. Kept as data so a change of tolerance is one visible diff."""
import torch

REL_TOL = {
    torch.float32: 2e-4,  # well under 1e-3; leaves room for tf32-free fp32 reductions in another order
    torch.bfloat16: 1e-2,
}
# Gradients accumulate more rounding (sums over thousands of rows in bf16).
REL_TOL_GRAD = {
    torch.float32: 5e-4,
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

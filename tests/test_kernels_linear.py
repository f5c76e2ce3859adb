"""Fused-linear kernels and adapter modules against the PyTorch reference (Triton
interpreter on CPU when there is no GPU). Sizes are odd on purpose: no dimension is a
multiple of a block, so every mask is exercised."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastground.kernels import adapters as ad
from fastground.kernels import fused_linear as fl
from tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _t(*shape, dtype, scale=1.0, grad=True):
    t = (torch.randn(*shape, device=DEVICE) * scale).to(dtype)
    return t.requires_grad_(grad)


def _linear_params(n, k, dtype):
    # nn.Linear's init scale keeps activations O(1) so relative errors mean something.
    return _t(n, k, dtype=dtype, scale=1 / math.sqrt(k)), _t(n, dtype=dtype, scale=0.5)


def _grads(out, g, tensors):
    for t in tensors:
        t.grad = None
    out.backward(g)
    return [t.grad.clone() if t.grad is not None else None for t in tensors]


def _compare(fast_fn, ref_fn, tensors, dtype, names):
    out = fast_fn()
    g = torch.randn_like(out)
    fast_grads = _grads(out, g, tensors)
    ref = ref_fn()
    ref_grads = _grads(ref, g, tensors)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref, dtype, what="forward")
    for name, a, b in zip(names, fast_grads, ref_grads):
        assert a is not None and a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, grad=True, what=f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n,bias", [((7,), 40, 48, True), ((13,), 24, 80, True), ((3, 5), 40, 48, True),
                                           ((7,), 24, 48, False)])
def test_linear_gelu(dtype, lead, k, n, bias):
    torch.manual_seed(k * n + len(lead))
    x = _t(*lead, k, dtype=dtype)
    w, b = _linear_params(n, k, dtype)
    b = b if bias else None
    ts = [x, w] + ([b] if bias else [])
    _compare(lambda: fl.linear_gelu(x, w, b), lambda: F.gelu(F.linear(x, w, b)), ts, dtype, ["x", "w", "b"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_projection(dtype, bias):
    torch.manual_seed(1)
    x = _t(2, 13, 24, dtype=dtype)
    w, b = _linear_params(48, 24, dtype)
    b = b if bias else None
    ts = [x, w] + ([b] if bias else [])
    _compare(lambda: ad.projection(x, w, b), lambda: F.linear(x, w, b), ts, dtype, ["x", "w", "b"])


def test_projection_noncontiguous_input():
    torch.manual_seed(2)
    x = torch.randn(40, 13, device=DEVICE).t().requires_grad_()  # (13, 40), column-major
    w, b = _linear_params(48, 40, torch.float32)
    _compare(lambda: ad.projection(x, w, b), lambda: F.linear(x, w, b), [x, w, b], torch.float32,
             ["x", "w", "b"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_adapter(dtype):
    torch.manual_seed(3)
    x = _t(13, 40, dtype=dtype)
    w1, b1 = _linear_params(80, 40, dtype)
    w2, b2 = _linear_params(48, 80, dtype)
    _compare(lambda: ad.mlp_adapter(x, w1, b1, w2, b2),
             lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
             [x, w1, b1, w2, b2], dtype, ["x", "w1", "b1", "w2", "b2"])


def _ln_ref(x, w, b, res, lw, lb, eps, p, mask):
    h = F.linear(x, w, b)
    if mask is not None:
        h = h * mask.view(h.shape).to(h.dtype) / (1 - p)
    return F.layer_norm(h + res, (w.shape[0],), lw, lb, eps)


def _ln_inputs(lead, k, n, dtype):
    x = _t(*lead, k, dtype=dtype)
    w, b = _linear_params(n, k, dtype)
    res = _t(*lead, n, dtype=dtype)
    lw = (1 + 0.1 * torch.randn(n, device=DEVICE)).to(dtype).requires_grad_()
    lb = (0.1 * torch.randn(n, device=DEVICE)).to(dtype).requires_grad_()
    return x, w, b, res, lw, lb


LN_SHAPES = [((13,), 40, 48), ((7,), 24, 80), ((2, 3), 32, 768)]  # the last: release width, BLOCK_N 1024


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", LN_SHAPES)
def test_linear_dropout_residual_layernorm_eval(dtype, lead, k, n):
    torch.manual_seed(4)
    x, w, b, res, lw, lb = ts = _ln_inputs(lead, k, n, dtype)
    # dropout_p > 0 but training=False: dropout must be the identity, as nn.Dropout in eval.
    _compare(lambda: fl.linear_dropout_residual_layernorm(x, w, b, res, lw, lb, 1e-12, 0.1, 7, False),
             lambda: _ln_ref(x, w, b, res, lw, lb, 1e-12, 0.0, None),
             list(ts), dtype, ["x", "w", "b", "residual", "ln_weight", "ln_bias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n,p", [((13,), 40, 48, 0.1), ((7,), 24, 80, 0.5), ((2, 3), 32, 768, 0.1)])
def test_linear_dropout_residual_layernorm_train(dtype, lead, k, n, p):
    torch.manual_seed(5)
    seed = 1234 + n
    x, w, b, res, lw, lb = ts = _ln_inputs(lead, k, n, dtype)
    m = math.prod(lead)
    mask = fl.dropout_mask(seed, m, n, p, DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (m, n)
    assert 0 < mask.sum() < mask.numel()
    _compare(lambda: fl.linear_dropout_residual_layernorm(x, w, b, res, lw, lb, 1e-12, p, seed, True),
             lambda: _ln_ref(x, w, b, res, lw, lb, 1e-12, p, mask),
             list(ts), dtype, ["x", "w", "b", "residual", "ln_weight", "ln_bias"])


def test_dropout_deterministic_by_seed():
    torch.manual_seed(6)
    x, w, b, res, lw, lb = ts = _ln_inputs((9,), 24, 80, torch.float32)

    def run(seed):
        out = fl.linear_dropout_residual_layernorm(x, w, b, res, lw, lb, 1e-12, 0.3, seed, True)
        g = torch.ones_like(out).cumsum(-1) / out.shape[-1]
        return out.detach(), _grads(out, g, list(ts))

    o1, g1 = run(99)
    o2, g2 = run(99)
    o3, _ = run(100)
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))  # no atomics: bitwise equal
    assert not torch.equal(o1, o3)
    assert torch.equal(fl.dropout_mask(99, 9, 80, 0.3, DEVICE), fl.dropout_mask(99, 9, 80, 0.3, DEVICE))
    assert not torch.equal(fl.dropout_mask(99, 9, 80, 0.3, DEVICE), fl.dropout_mask(100, 9, 80, 0.3, DEVICE))


def test_dropout_seed_drawn_from_torch_generator():
    x, w, b, res, lw, lb = _ln_inputs((5,), 24, 48, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(fl.linear_dropout_residual_layernorm(x, w, b, res, lw, lb, 1e-12, 0.3, None, True))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    m, n = 128, 768
    mask = fl.dropout_mask(2024, m, n, p, DEVICE).float()
    keep = mask.mean().item()
    sigma = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(keep - (1 - p)) < 5 * sigma, (keep, 1 - p)
    # Counter-based masks must not repeat across rows or columns.
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    col = mask.mean(0)
    assert abs(col.mean().item() - (1 - p)) < 5 * sigma
    assert (col - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / m)


def test_dropout_extremes():
    assert fl.dropout_mask(3, 4, 48, 0.0, DEVICE).all()
    assert not fl.dropout_mask(3, 4, 48, 1.0, DEVICE).any()
    x, w, b, res, lw, lb = _ln_inputs((4,), 24, 48, torch.float32)
    out = fl.linear_dropout_residual_layernorm(x, w, b, res, lw, lb, 1e-12, 1.0, 3, True)
    assert_close(out, F.layer_norm(res, (48,), lw, lb, 1e-12), torch.float32, what="p=1")


def test_dtype_mismatch_raises():
    x = torch.randn(3, 8, device=DEVICE)
    w = torch.randn(4, 8, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        fl.linear(x, w, None)


# ---------------------------------------------------------------------------- modules
def _ref_mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(40, 80), nn.GELU(), nn.Linear(80, 48)).to(DEVICE, dtype)


def test_module_state_dict_keys():
    from fastground.fast.adapters import FastLinear, FastMLPAdapter

    class Holder(nn.Module):  # the release's attribute names
        def __init__(self, mlp, proj):
            super().__init__()
            self.mm_vision_projector = mlp
            self.llama_proj = proj

    ref = Holder(nn.Sequential(nn.Linear(40, 80), nn.GELU(), nn.Linear(80, 48)), nn.Linear(24, 48))
    fast = Holder(FastMLPAdapter(40, 80, 48), FastLinear(24, 48))
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert "mm_vision_projector.0.weight" in fast.state_dict()
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert isinstance(fast.mm_vision_projector, nn.Sequential) and isinstance(fast.llama_proj, nn.Linear)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_match_reference(dtype):
    from fastground.fast.adapters import FastLinear, FastMLPAdapter

    torch.manual_seed(8)
    ref = _ref_mlp(dtype)
    fast = FastMLPAdapter.from_module(ref)
    x = _t(2, 7, 40, dtype=dtype)
    params = [x, *fast.parameters()]
    ref_params = [x, *ref.parameters()]
    out = fast(x)
    g = torch.randn_like(out)
    fg = _grads(out, g, params)
    rg = _grads(ref(x), g, ref_params)
    assert_close(out, ref(x), dtype, what="FastMLPAdapter")
    for a, b_ in zip(fg, rg):
        assert_close(a, b_, dtype, grad=True, what="FastMLPAdapter grad")

    lin = nn.Linear(24, 48).to(DEVICE, dtype)
    flin = FastLinear.from_module(lin)
    x = _t(5, 24, dtype=dtype)
    assert_close(flin(x), lin(x), dtype, what="FastLinear")


def test_module_fallback_warns_once(monkeypatch):
    from fastground.fast import adapters as fa
    from fastground.fast import runtime

    monkeypatch.setattr(runtime, "triton_usable", lambda *t: False)
    monkeypatch.setattr(runtime, "_warned", False)
    torch.manual_seed(9)
    ref = _ref_mlp()
    fast = fa.FastMLPAdapter.from_module(ref)
    lin = nn.Linear(24, 48).to(DEVICE)
    flin = fa.FastLinear.from_module(lin)
    x = torch.randn(3, 40, device=DEVICE)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fast(x)
        out2 = flin(x[:, :24])
        fast(x)
    assert torch.equal(out, ref(x)) and torch.equal(out2, lin(x[:, :24]))
    assert len([w for w in rec if "Triton cannot run" in str(w.message)]) == 1

"""Masked keys never reach the arithmetic, and the attention accumulator cannot overflow where
torch's own computation stays finite (issue 13, kernels).

A padded frame or clip may hold anything (NaN, inf, stale memory): the fast path must give the
same output and the same gradients, forward and backward, as with harmless values there, and
zero gradient into the padded input. Values near bf16's largest finite value must not overflow
the softmax accumulator when torch's normalised probabilities @ V stay finite.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fastground
from fastground.kernels import cross_attention as ca
from fastground.kernels.cross_attention import attention
from fastground.kernels.kv_proj_pe import kv_proj_pe
from fastground.model.qformer import extended_key_mask

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def _poison(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Copy of t with NaN, +inf and -inf cycling over the rows selected by `where` (..., L)."""
    out = t.detach().clone()
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=out.dtype)
    idx = where.nonzero(as_tuple=True)
    vals = bad[torch.arange(idx[0].numel()) % 3]
    out[idx] = vals.view(-1, *([1] * (out.dim() - len(idx)))).expand(-1, *out.shape[len(idx):]).to(out.dtype)
    return out


def _run_attention(q, k, v, mask, p=0.0, seed=0):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask, dropout_p=p, seed=seed, training=p > 0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["eval", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_nan_inf_in_masked_keys_change_no_output_and_no_gradient(dtype, dropout):
    torch.manual_seed(0)
    B, H, Lq, Lk, D = 3, 2, 8, 40, 16
    q, k, v = (torch.randn(B, H, L, D).to(dtype) for L in (Lq, Lk, Lk))
    mask = torch.ones(B, Lk, dtype=torch.long)
    mask[0, 29:] = 0  # a short sequence padded to Lk
    mask[1, ::3] = 0  # scattered padding
    masked = (mask == 0)[:, None, :].expand(B, H, Lk)
    clean = _run_attention(q, k, v, mask, dropout, 5)
    dirty = _run_attention(q, _poison(k, masked), _poison(v, masked), mask, dropout, 5)
    for name, a, b in zip(["out", "dq", "dk", "dv"], clean, dirty):
        assert torch.isfinite(b.float()).all(), name
        assert torch.equal(a, b), name
    assert (dirty[2][masked] == 0).all() and (dirty[3][masked] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_kv_projection_never_reads_masked_rows(dtype):
    """Masked rows' K/V are the bias alone; their x gets zero gradient and NaN there reaches
    neither the weight nor the position-embedding gradients."""
    torch.manual_seed(1)
    B, T, R, din, dout = 2, 5, 3, 24, 16
    rows = torch.ones(B, T * R, dtype=torch.long)
    rows[0, 9:] = 0
    x = torch.randn(B, T * R, din).to(dtype)
    pe = torch.randn(T, din).to(dtype)
    w = [torch.randn(dout, din).to(dtype) * 0.2 for _ in range(2)]
    b = [torch.randn(dout).to(dtype) for _ in range(2)]

    def run(xin):
        ins = [t.clone().requires_grad_() for t in (xin, pe, w[0], b[0], w[1], b[1])]
        k, v = kv_proj_pe(ins[0], ins[1], R, T, ins[2], ins[3], ins[4], ins[5], row_mask=rows)
        gen = torch.Generator().manual_seed(2)
        (k.float() * torch.randn(k.shape, generator=gen)).sum().add_((v.float() * torch.randn(v.shape, generator=gen)).sum()).backward()
        return [k.detach(), v.detach()] + [t.grad for t in ins]

    clean = run(x.masked_fill(rows[..., None] == 0, 0.0))
    dirty = run(_poison(x, rows == 0))
    for i, (a, c) in enumerate(zip(clean, dirty)):
        assert torch.isfinite(c.float()).all(), i
        assert torch.equal(a, c), i
    k = dirty[0]
    assert torch.equal(k[0, 9:], b[0].expand(k.shape[1] - 9, -1))
    assert (dirty[2][0, 9:] == 0).all()


def _fast_video_model(dtype):
    from test_fast_path import branch_config, models
    ref, fast = models(branch_config(7, 8, 3, 24), dtype)
    return fast


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_video_branch_padded_frames_with_nan_change_nothing(dtype):
    """End to end through the fast video branch, forward and backward: NaN
    and inf in padded frames change neither the output nor any parameter gradient."""
    fast = _fast_video_model(dtype)
    fast.eval()
    torch.manual_seed(3)
    feats = torch.randn(3, 7, 3, 24).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    pad = (mask == 0)

    def run(x):
        for p in fast.parameters():
            p.grad = None
        x = x.clone().requires_grad_()
        out = fast.video_branch(x, mask)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype))
        grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
        return out.detach(), x.grad, grads

    out_c, dx_c, g_c = run(feats.masked_fill(pad[..., None, None], 0.0))
    out_d, dx_d, g_d = run(_poison(feats, pad))
    assert torch.isfinite(out_d.float()).all() and torch.equal(out_c, out_d)
    assert (dx_d[pad] == 0).all() and torch.equal(dx_c, dx_d)
    assert set(g_c) == set(g_d) and len(g_d) > 10
    for n in g_c:
        assert torch.isfinite(g_d[n].float()).all(), n
        assert torch.equal(g_c[n], g_d[n]), n


# --------------------------------------------------------------------------- overflow
def _ref_bf16(q, k, v, mask=None):
    """The reference computation in bf16, as torch runs the Q-Former (probabilities rounded to
    bf16, products accumulated in fp32)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    bias = extended_key_mask(mask, scores.dtype)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("splits", [False, True], ids=["one_split", "key_splits"])
def test_attention_near_bf16_max_stays_finite_where_torch_does(splits):
    torch.manual_seed(6)
    B, H, Lq, Lk, D = 2, 2, 8, 96, 16
    big = torch.finfo(torch.bfloat16).max * 0.75  # 2.55e38: any two of them overflow fp32 when added
    q = (torch.randn(B, H, Lq, D) * 0.01).to(torch.bfloat16)
    k = torch.randn(B, H, Lk, D).to(torch.bfloat16)
    v = (torch.sign(torch.randn(B, H, Lk, D)) * big).to(torch.bfloat16)
    v[:, :, :, 0] = big  # a column whose every value is huge and positive
    ref = _ref_bf16(q, k, v)
    assert torch.isfinite(ref.float()).all()
    if splits:
        mask8, fill = ca._mask_args(None, B, Lk, q.device)
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, num_warps=4, num_stages=2, keys_per_split=32)
        out, _ = ca._attn_forward(q, k, v, mask8, fill, D ** -0.5, 0.0, ca.philox_key(0), cfg=cfg)
    else:
        out = attention(q, k, v)
    assert torch.isfinite(out.float()).all()
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < 1e-2, err

"""Device-side dropout seeds (what makes the branches capturable in a CUDA graph) and
fastground.fast.graphed.

On CPU the interpreter runs the device-seed path through `runtime.device_seeds()`: the keys
come from a device counter, every call draws a fresh key, the backward reuses the forward's,
and the masks are exactly those `attention_dropout_mask` / `dropout_mask` give for that key.
The capture itself needs a GPU."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fastground.kernels import runtime
from fastground.kernels.cross_attention import attention, attention_dropout_mask
from fastground.kernels.fused_linear import dropout_mask, linear_dropout_residual_layernorm
from tolerances import REL_TOL, REL_TOL_GRAD, rel_err


def _ref_attention(q, k, v, keep, p):
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return (probs * keep / (1 - p)) @ v


def test_attention_dropout_with_device_keys_matches_its_mask_and_advances():
    torch.manual_seed(0)
    B, H, Lq, Lk, D, p = 2, 2, 8, 20, 16, 0.3
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for L in (Lq, Lk, Lk))
    with runtime.device_seeds():
        state_before = None if torch.device("cpu") not in runtime._SEED_STATE else \
            runtime._SEED_STATE[torch.device("cpu")][1].item()
        out1 = attention(q, k, v, dropout_p=p, training=True)
        base, counter = runtime._SEED_STATE[torch.device("cpu")]
        key1 = (base + counter).clone()
        out2 = attention(q, k, v, dropout_p=p, training=True)
    assert state_before is None or counter.item() == state_before + 2
    assert not torch.equal(out1, out2)  # the counter advanced: a fresh mask
    keep = attention_dropout_mask(key1, B, H, Lq, Lk, p)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _ref_attention(qd, kd, vd, keep.double(), p)
    assert rel_err(out1, ref) <= REL_TOL[torch.float32]
    g = torch.randn(out1.shape)
    out1.backward(g)
    ref.backward(g.double())
    for a, b in ((q, qd), (k, kd), (v, vd)):
        assert rel_err(a.grad, b.grad) <= REL_TOL_GRAD[torch.float32]


def test_layernorm_block_dropout_with_device_keys():
    torch.manual_seed(1)
    M, K, N, p = 12, 16, 24, 0.25
    x, res = torch.randn(M, K), torch.randn(M, N)
    w, b, lw, lb = torch.randn(N, K) / 4, torch.randn(N), torch.randn(N), torch.randn(N)
    with runtime.device_seeds():
        y = linear_dropout_residual_layernorm(x, w, b, res, lw, lb, 1e-12, p, None, True)
        base, counter = runtime._SEED_STATE[torch.device("cpu")]
        key = (base + counter).clone()
    keep = dropout_mask(key, M, N, p, "cpu")
    ref = torch.nn.functional.layer_norm((x @ w.T + b) * keep / (1 - p) + res, (N,), lw, lb, 1e-12)
    assert rel_err(y, ref) <= REL_TOL[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs capture device work: needs a CUDA GPU (run by bench/gpu_session.sh tests)")
def test_graphed_video_branch_replays_with_fresh_dropout_and_same_function():
    import fastground
    from fastground import GroundingGPT, GroundingGPTConfig
    from fastground.testing import with_token_ids
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny"))
    torch.manual_seed(0)
    model = GroundingGPT(cfg).cuda()
    fastground.patch(model)
    inner = model.model
    feats = torch.randn(2, cfg.num_frames, cfg.num_query_token, cfg.qformer_hidden_size, device="cuda")
    inner.eval()
    eager = inner.video_branch(feats).detach()
    step = fastground.fast.graphed(inner.video_branch, (feats,))
    assert rel_err(step(feats), eager) <= REL_TOL[torch.float32]
    inner.train()
    step = fastground.fast.graphed(inner.video_branch, (feats,))
    a, b = step(feats), step(feats)
    assert not torch.equal(a, b)  # each replay draws fresh dropout keys
    b.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in inner.video_Qformer.parameters() if p.grad is not None)


def test_graphed_refuses_cpu_tensors():
    import fastground.fast
    with pytest.raises(ValueError, match="CUDA"):
        fastground.fast.graphed(lambda x: x, (torch.randn(2),))

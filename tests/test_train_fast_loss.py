"""The answer-only fused linear cross-entropy (kernels/fused_ce.py) against lm_head +
cross_entropy, forward and backward, fp32 and bf16, and proof that it never builds a
(tokens x vocab) tensor."""
import pytest
import torch

import fastground.kernels.fused_ce as fce
from fastground.kernels.fused_ce import linear_cross_entropy, reference_linear_cross_entropy
from tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(n, h, v, dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * 2).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return x, w, b, t


def _both(x, w, b, t, rows):
    leaves = [[p.detach().clone().requires_grad_() if p is not None else None for p in (x, w, b)] for _ in range(2)]
    (xa, wa, ba), (xb, wb, bb) = leaves
    out = linear_cross_entropy(xa, wa, t, ba, rows=rows)
    ref = reference_linear_cross_entropy(xb, wb, t, bb)
    out.backward()
    ref.backward()
    return out, ref, (xa, wa, ba), (xb, wb, bb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,v,rows,bias", [
    (37, 24, 1003, 8, False),  # vocab not a multiple of anything, rows not a multiple of the chunk
    (1, 16, 509, 4, True),  # one answer token
    (64, 32, 250, 64, False),  # every position an answer, one chunk
    (13, 8, 97, 1, True),  # one row per chunk
])
def test_matches_lm_head_and_cross_entropy(dtype, n, h, v, rows, bias):
    x, w, b, t = _inputs(n, h, v, dtype, bias)
    out, ref, (xa, wa, ba), (xb, wb, bb) = _both(x, w, b, t, rows)
    assert out.dtype == torch.float32
    assert_close(out, ref, dtype, what="loss")
    assert_close(xa.grad, xb.grad, dtype, grad=True, what="d hidden")
    assert_close(wa.grad, wb.grad, dtype, grad=True, what="d lm_head")
    if bias:
        assert_close(ba.grad, bb.grad, dtype, grad=True, what="d bias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_answer_token_gives_zero_loss_with_zero_gradients(dtype):
    x, w, _, _ = _inputs(0, 16, 101, dtype)
    x.requires_grad_()
    w.requires_grad_()
    out = linear_cross_entropy(x, w, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0
    assert w.grad is not None and torch.count_nonzero(w.grad) == 0  # the hook still fires (ZeRO-2)


def test_only_answer_rows_reach_lm_head_and_chunks_stay_bounded(monkeypatch):
    """Counts every row lm_head is applied to: the answer rows once in forward and once in
    backward, never more than `rows` at a time; a logits-for-all implementation fails."""
    seen = []
    real = fce._logits

    def counting(h, w, b):
        seen.append(h.shape[0])
        return real(h, w, b)

    monkeypatch.setattr(fce, "_logits", counting)
    x, w, _, t = _inputs(45, 16, 301, torch.float32)
    x.requires_grad_()
    linear_cross_entropy(x, w, t, rows=10).backward()
    assert sum(seen) == 2 * 45 and max(seen) <= 10


def test_never_allocates_a_tokens_by_vocab_tensor():
    """Tracks allocations with the profiler: no single op of forward + backward allocates
    as much as the (tokens x vocab) fp32 logits would take (the reference does)."""
    from torch.profiler import ProfilerActivity, profile
    n, h, v, rows = 256, 32, 2000, 16
    x, w, _, t = _inputs(n, h, v, torch.float32)

    def biggest(fn):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(xa, wa, t).backward()
        return max(e.cpu_memory_usage for e in prof.events())

    full = n * v * 4
    assert biggest(lambda a, b, c: reference_linear_cross_entropy(a, b, c)) >= full  # the check can fail
    assert biggest(lambda a, b, c: linear_cross_entropy(a, b, c, rows=rows)) < full / 4

"""Backbone attention at Vicuna-7B heads (32 x 128), sequence 2048, causal, bf16.

Variants: `eager` materialises softmax(QK^T)V as attn_implementation="eager" does (scores
in fp32 for the softmax); `sdpa` is torch's scaled_dot_product_attention, what the
reference backbone runs when flash_attn is absent (FlashAttention-2 kernels on GPU);
`flash_attn` is the flash_attn package, what the backbone picks when it is installed.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from bench import floors, harness

VARIANTS = ("eager", "sdpa", "flash_attn")
MODES = ("fwd", "fwd+bwd")
N_INPUT_SETS = 3


def eager_attention(q, k, v):
    s = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_attention(benchmark, fg, variant, mode, batch):
    fg.require(cpu_ok=False)
    cfg = fg.cfg
    heads, d = cfg.num_attention_heads, cfg.head_dim
    seq = 2048 if fg.shapes == "release" else 128
    backward = mode == "fwd+bwd"
    if variant == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            pytest.skip("flash_attn is not installed here")
        layout = (batch, seq, heads, d)

        def call(q, k, v):
            return flash_attn_func(q, k, v, causal=True)
    else:
        layout = (batch, heads, seq, d)
        call = eager_attention if variant == "eager" else sdpa_attention
    if variant == "eager" and fg.gpu:
        # fp32 scores, fp32 probabilities and their bf16 copy, kept for backward
        need = batch * heads * seq * seq * (4 + 4 + 2) * (2 if backward else 1)
        free, _ = torch.cuda.mem_get_info(fg.device)
        if need > 0.9 * free:
            pytest.skip(f"eager attention would need ~{need / harness.GIB:.0f} GiB of scores "
                        f"({free / harness.GIB:.0f} GiB free)")

    inputs = [tuple(fg.randn(*layout, seed=300 + 3 * i + j).requires_grad_(backward) for j in range(3))
              for i in range(N_INPUT_SETS)]
    grads = [fg.randn(*layout, seed=400 + i) for i in range(N_INPUT_SETS)]
    grad_of = {id(x[0]): g for x, g in zip(inputs, grads)}
    cost = floors.attention(batch, heads, seq, seq, d, causal=True, itemsize=fg.itemsize, backward=backward)
    info = harness.CaseInfo(bench="attention", variant=variant, mode=mode, batch=batch,
                            shape=f"{batch}x{heads}x{seq}x{d}", dtype=str(fg.dtype).replace("torch.", ""),
                            cost=cost, items_per_call=batch)

    def body():
        if backward:
            def fn(q, k, v):
                call(q, k, v).backward(grad_of[id(q)])

            def before():
                for t in inputs:
                    for x in t:
                        x.grad = None
        else:
            def fn(q, k, v):
                with torch.no_grad():
                    return call(q, k, v)
            before = None
        harness.run_case(benchmark, fg, info, fn, inputs, before_each=before)

    harness.oom_guard(fg, body)
    del inputs, grads, grad_of
    harness.free_memory(fg.device)

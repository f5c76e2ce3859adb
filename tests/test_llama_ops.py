"""Fused Llama ops (kernels/llama_ops.py) against transformers' modules, forward and
backward, fp32 and bf16, odd shapes; and the class swap of fastground.patch on a Llama
backbone (state dict bit-identical, same function)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from fastground.fast.llama import FastLlamaAttention, FastLlamaMLP, FastRMSNorm, patch_llama, unpatch_llama
from fastground.kernels.llama_ops import rms_norm, rope, swiglu
from tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16]


def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 200), (7, 130)])
def test_rms_norm_matches_transformers(dtype, shape):
    torch.manual_seed(0)
    n = shape[-1]
    x = torch.randn(*shape, dtype=dtype) * 3
    ref = LlamaRMSNorm(n, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(n) * 0.3 + 1)
    w = _leaf(ref.weight)
    xa, xb = _leaf(x), _leaf(x)
    y, yr = rms_norm(xa, w, 1e-6), ref(xb)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert_close(y, yr, dtype, what="rms_norm")
    assert_close(xa.grad, xb.grad, dtype, grad=True, what="rms_norm dx")
    assert_close(w.grad, ref.weight.grad, dtype, grad=True, what="rms_norm dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 19), (1, 1, 1), (3, 1037)])
def test_swiglu_matches_silu_times_up(dtype, shape):
    torch.manual_seed(1)
    g0, u0 = torch.randn(*shape, dtype=dtype) * 2, torch.randn(*shape, dtype=dtype)
    ga, ua, gb, ub = _leaf(g0), _leaf(u0), _leaf(g0), _leaf(u0)
    out, ref = swiglu(ga, ua), F.silu(gb) * ub
    do = torch.randn_like(ref)
    out.backward(do)
    ref.backward(do)
    assert_close(out, ref, dtype, what="swiglu")
    assert_close(ga.grad, gb.grad, dtype, grad=True, what="swiglu dgate")
    assert_close(ua.grad, ub.grad, dtype, grad=True, what="swiglu dup")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,length,d,strided", [(2, 3, 5, 10, True), (1, 5, 9, 6, False), (3, 1, 1, 2, True)])
def test_rope_matches_apply_rotary_pos_emb(dtype, b, h, length, d, strided):
    torch.manual_seed(2)
    # the attention hands RoPE a transposed view of (B, L, H, D)
    x = torch.randn(b, length, h, d, dtype=dtype).transpose(1, 2) if strided else torch.randn(b, h, length, d, dtype=dtype)
    cos, sin = torch.randn(b, length, d, dtype=dtype), torch.randn(b, length, d, dtype=dtype)
    xa, xb = _leaf(x), _leaf(x)
    y = rope(xa, cos, sin)
    yr, _ = apply_rotary_pos_emb(xb, xb.detach(), cos, sin)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert_close(y, yr, dtype, what="rope")
    assert_close(xa.grad, xb.grad, dtype, grad=True, what="rope dx")


def _llama(dtype):
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(3)
    return LlamaModel(cfg).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patched_llama_is_the_same_function_and_state(dtype):
    model = _llama(dtype)
    ids = torch.randint(0, 97, (2, 11))
    probe = torch.randn(2, 11, 48)  # a random projection: mean(out^2) would cancel through the last norm

    def run():
        model.zero_grad()
        out = model(input_ids=ids).last_hidden_state
        (out.float() * probe).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_out, ref_grads = run()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert patch_llama(model) == 2 * 4 + 1  # per layer 2 norms, MLP, attention; the final norm
    assert sum(type(m) is FastRMSNorm for m in model.modules()) == 2 * 2 + 1
    assert sum(type(m) is FastLlamaMLP for m in model.modules()) == 2
    assert sum(type(m) is FastLlamaAttention for m in model.modules()) == 2
    out, grads = run()
    assert_close(out, ref_out, dtype, what="patched output")
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], dtype, grad=True, what=n)
    sd = model.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in sd)
    unpatch_llama(model)
    assert not any(type(m).__name__.startswith("Fast") for m in model.modules())


def test_fused_ops_really_run_in_the_patched_model(monkeypatch):
    import fastground.fast.llama as fl
    calls = {"rms": 0, "rope": 0, "swiglu": 0}
    for name, key in (("rms_norm", "rms"), ("rope", "rope"), ("swiglu", "swiglu")):
        fn = getattr(fl, name)
        monkeypatch.setattr(fl, name, lambda *a, _fn=fn, _k=key, **k: (calls.__setitem__(_k, calls[_k] + 1), _fn(*a, **k))[1])
    model = _llama(torch.float32)
    patch_llama(model)
    model(input_ids=torch.randint(0, 97, (1, 5)))
    assert calls == {"rms": 5, "rope": 4, "swiglu": 2}

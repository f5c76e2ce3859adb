"""Fused RMSNorm, RoPE and SwiGLU in transformers' Llama layers, swapped in by class.

`patch_llama(model)` changes the class of every LlamaRMSNorm, LlamaMLP and LlamaAttention
under `model` to a subclass here that adds no state: parameters stay the same objects and
the state dict is bit-identical; `unpatch_llama` changes them back. Where Triton cannot run
(CPU without TRITON_INTERPRET) the subclasses run the reference forward.

RoPE: transformers' attention forward calls the module-level `apply_rotary_pos_emb` of
modeling_llama. That name is replaced once by a dispatcher that runs the fused kernel while
a FastLlamaAttention is inside its forward and the original function otherwise, so other
Llama models of the process are untouched and the attention code is transformers' own.
"""
from __future__ import annotations

import contextvars

from torch import nn
from transformers.models.llama import modeling_llama as ml

from fastground.fast.runtime import triton_usable
from fastground.kernels.llama_ops import rms_norm, rope, swiglu

_fused_rope = contextvars.ContextVar("fastground_fused_rope", default=False)
_original_rope = ml.apply_rotary_pos_emb


def _dispatch_rope(q, k, cos, sin, *args, **kwargs):
    if _fused_rope.get() and not args and not kwargs and triton_usable(q, k, cos):
        return rope(q, cos, sin), rope(k, cos, sin)
    return _original_rope(q, k, cos, sin, *args, **kwargs)


class FastRMSNorm(ml.LlamaRMSNorm):
    def forward(self, hidden_states):
        if not triton_usable(hidden_states, self.weight):
            return super().forward(hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class FastLlamaMLP(ml.LlamaMLP):
    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.config.hidden_act not in ("silu", "swish") or not triton_usable(gate, up):
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(swiglu(gate, up))


class FastLlamaAttention(ml.LlamaAttention):
    def forward(self, *args, **kwargs):
        token = _fused_rope.set(True)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _fused_rope.reset(token)


SWAPS = ((ml.LlamaRMSNorm, FastRMSNorm), (ml.LlamaMLP, FastLlamaMLP), (ml.LlamaAttention, FastLlamaAttention))


def _swap_classes(model: nn.Module, pairs) -> int:
    """Re-class every module whose exact type is a `from` of `pairs`; parameters untouched."""
    table = dict(pairs)
    n = 0
    for m in model.modules():
        to = table.get(type(m))
        if to is not None:
            m.__class__ = to
            n += 1
    return n


def patch_llama(model: nn.Module) -> int:
    """Swap every Llama norm, MLP and attention under `model`; returns how many modules."""
    if ml.apply_rotary_pos_emb is not _dispatch_rope:
        ml.apply_rotary_pos_emb = _dispatch_rope
    return _swap_classes(model, SWAPS)


def unpatch_llama(model: nn.Module) -> int:
    return _swap_classes(model, [(fast, ref) for ref, fast in SWAPS])


def llama_patched_layers(model: nn.Module) -> int:
    return sum(type(m) is FastLlamaMLP for m in model.modules())

"""Backbone attention through torch's bundled FlashAttention-2 varlen kernel
(`torch.nn.attention.varlen.varlen_attn`), for GPUs where the `flash_attn` package is not
installed. Registered with transformers as the "fastground_varlen" implementation.

Padded batches are unpadded to one token stream with cumulative lengths, as flash_attn's
own path does, so padding costs no attention FLOPs; packed batches pass their `cu_seqlens`
straight through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "fastground_varlen"


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False):
    """Per-sequence SDPA with the varlen kernel's calling convention (T, H, D); used on CPU
    and by the tests to check the unpadding around the kernel."""
    out = torch.empty_like(q)
    causal = window_size == (-1, 0)
    for i in range(cu_q.numel() - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[a:b], k[c:d], v[c:d]))
        out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale,
                                                  enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


def _kernel():
    if torch.cuda.is_available():
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn
    return varlen_reference


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention interface: query (B, H, L, D) -> ((B, L, H, D), None)."""
    b, h, length, d = query.shape
    gqa = key.shape[1] != h
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, H, D)
    attn = _kernel()
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        out = attn(q.reshape(b * length, h, d), k.reshape(b * length, -1, d), v.reshape(b * length, -1, d),
                   cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
        return out.view(b, length, h, d), None
    if attention_mask is None:
        cu = torch.arange(0, (b + 1) * length, length, device=q.device, dtype=torch.int32)
        out = attn(q.reshape(b * length, h, d), k.reshape(b * length, -1, d), v.reshape(b * length, -1, d),
                   cu, cu, length, length, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
        return out.view(b, length, h, d), None
    keep = attention_mask.bool()  # (B, L) padding mask, as transformers' flash mask function hands it over
    idx = keep.flatten().nonzero().squeeze(1)
    lens = keep.sum(1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lens.max())
    qu, ku, vu = (t.reshape(b * length, t.shape[2], d)[idx] for t in (q, k, v))
    out_u = attn(qu, ku, vu, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
    out = out_u.new_zeros(b * length, h, d).index_copy(0, idx, out_u)
    return out.view(b, length, h, d), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True

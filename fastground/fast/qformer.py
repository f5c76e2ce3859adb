"""Fast Q-Former: the reference module's parameters, forward on the fused Triton kernels.

`FastQFormer` / `FastQFormerBert` add no state to `QFormer` / `QFormerBert`: `patch()` turns
a reference instance into a fast one by changing its class, so parameters, hooks and
optimizer references stay the very same objects.

Per layer (launches): QKV of the queries (1 GEMM), self-attention (1), output block
(GEMM + dropout/residual/LayerNorm row kernel), cross-attention query (1 GEMM), the
encoder keys/values (see below), cross-attention (1), output block (2), feed-forward
dense+GELU (1), output block (2).

Keys and values of *every* cross-attention layer come from one `kv_proj_pe` launch over the
concatenated weights: the encoder states (64 frames x 32 queries at release shapes, the
largest tensor of the branch) are read once for both layers, with the temporal position
embedding added in the GEMM's load, so X+PE is never written.

Boundaries that stay: attention needs all keys of a row before the output GEMM (a grid-wide
dependency), and the LayerNorm needs whole 768-wide rows that a GEMM tile does not hold at
good occupancy (see kernels/fused_linear.py), so those are separate launches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastground.kernels.cross_attention import attention
from fastground.fast.runtime import compute_dtype, triton_or_warn
from fastground.kernels.fused_linear import linear, linear_dropout_residual_layernorm, linear_gelu
from fastground.kernels.kv_proj_pe import kv_proj_pe
from fastground.model.qformer import QFormer, QFormerBert, QFormerOutput, QFormerSelfOutput

def _flat_linear(fn, x, layer, dt):
    y = fn(x.reshape(-1, x.shape[-1]), layer.weight.to(dt), None if layer.bias is None else layer.bias.to(dt))
    return y.view(*x.shape[:-1], y.shape[-1])


def _output_block(block: QFormerSelfOutput, ctx, residual, training, dt):
    ln = block.LayerNorm
    y = linear_dropout_residual_layernorm(
        ctx.reshape(-1, ctx.shape[-1]), block.dense.weight.to(dt), block.dense.bias.to(dt),
        residual.reshape(-1, residual.shape[-1]), ln.weight.to(dt), ln.bias.to(dt), ln.eps,
        block.dropout.p, None, training)
    return y.view(residual.shape)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D) as a view (the attention kernel takes strided inputs)."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def _context(o: torch.Tensor) -> torch.Tensor:
    """Attention output (B, H, L, D), stored as (B, L, H, D) -> (B, L, H*D) without a copy."""
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


class FastQFormerBert(QFormerBert):
    def encoder_kv(self, states, pe, rows_per_pos, num_pos, dt):
        """K, V of every cross-attention layer in one launch."""
        layers = [l for l in self.encoder.layer if l.has_cross_attention]
        selfs = [l.crossattention.self for l in layers]
        wk = torch.cat([s.key.weight for s in selfs]).to(dt)
        bk = torch.cat([s.key.bias for s in selfs]).to(dt)
        wv = torch.cat([s.value.weight for s in selfs]).to(dt)
        bv = torch.cat([s.value.bias for s in selfs]).to(dt)
        if pe is None:  # no position embedding: a zero row keeps one kernel for both cases
            pe, rows_per_pos, num_pos = states.new_zeros(1, states.shape[-1]), 1, 1
        k, v = kv_proj_pe(states.to(dt), pe.to(dt), rows_per_pos, num_pos, wk, bk, wv, bv)
        width = self.spec.hidden_size
        return [(k[..., i * width:(i + 1) * width], v[..., i * width:(i + 1) * width]) for i in range(len(layers))]

    def forward(self, query_embeds, encoder_hidden_states, encoder_attention_mask=None, attention_mask=None,
                return_dict: bool = True, encoder_pe=None, rows_per_pos: int = 1, num_pos: int = 1):
        """As QFormerBert.forward; `encoder_pe` (P, width) adds encoder_pe[(r // rows_per_pos) % num_pos]
        to encoder row r inside the key/value GEMM (the temporal position encoding)."""
        params = [p for p in self.parameters()][:1]
        if not triton_or_warn(query_embeds, encoder_hidden_states, *params):
            states = encoder_hidden_states
            if encoder_pe is not None:
                n, length, w = states.shape
                idx = (torch.arange(length, device=states.device) // rows_per_pos) % num_pos
                states = states + encoder_pe[idx]
            return super().forward(query_embeds, states, encoder_attention_mask, attention_mask, return_dict)
        dt = compute_dtype(query_embeds)
        training = self.training
        emb = self.embeddings
        h = F.dropout(F.layer_norm(query_embeds.to(dt), emb.LayerNorm.normalized_shape, emb.LayerNorm.weight.to(dt),
                                   emb.LayerNorm.bias.to(dt), emb.LayerNorm.eps), emb.dropout.p, training)
        kv = iter(self.encoder_kv(encoder_hidden_states, encoder_pe, rows_per_pos, num_pos, dt))
        heads = self.spec.num_heads
        for layer in self.encoder.layer:
            sa = layer.attention.self
            qkv = _flat_linear(linear, h, _Cat(sa.query, sa.key, sa.value), dt)
            q, k, v = qkv.chunk(3, dim=-1)
            ctx = attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), attention_mask,
                            sa.dropout.p, None, training)
            h = _output_block(layer.attention.output, _context(ctx), h, training, dt)
            if layer.has_cross_attention:
                ca = layer.crossattention.self
                ck, cv = next(kv)
                q = _flat_linear(linear, h, ca.query, dt)
                ctx = attention(_heads(q, heads), _heads(ck, heads), _heads(cv, heads), encoder_attention_mask,
                                ca.dropout.p, None, training)
                h = _output_block(layer.crossattention.output, _context(ctx), h, training, dt)
            inter = _flat_linear(linear_gelu, h, layer.intermediate_query.dense, dt)
            h = _output_block(layer.output_query, inter, h, training, dt)
        return QFormerOutput(h) if return_dict else (h,)


class _Cat:
    """Q, K and V weights side by side, so the self-attention projections are one GEMM."""

    def __init__(self, *layers):
        self.weight = torch.cat([l.weight for l in layers])
        self.bias = torch.cat([l.bias for l in layers])


class FastQFormer(QFormer):
    pass


def to_fast(q: QFormer) -> QFormer:
    q.__class__ = FastQFormer
    q.bert.__class__ = FastQFormerBert
    return q


def to_reference(q: QFormer) -> QFormer:
    q.__class__ = QFormer
    q.bert.__class__ = QFormerBert
    return q

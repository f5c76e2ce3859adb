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

import inspect
import weakref

import torch
import torch.nn.functional as F

from fastground.kernels.cross_attention import attention, key_mask_plan
from fastground.fast.runtime import compute_dtype, triton_or_warn
from fastground.kernels.fused_linear import linear, linear_dropout_residual_layernorm, linear_gelu
from fastground.kernels.kv_proj_pe import kv_proj_pe
from fastground.model.qformer import QFormer, QFormerBert, QFormerOutput


def _flat_linear(fn, x, weight, bias):
    y = fn(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def _output_block(block, ctx, residual, training, dt):
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


# --------------------------------------------------------------------------- fused weights
# Concatenated weights (Q|K|V of each self-attention; K and V of every cross-attention layer).
# Trainable weights are concatenated on every call: an optimizer may write them through
# `.data` (DeepSpeed's ZeRO stages copy updated partitions into the parameters that way), which
# moves neither the version counter nor the data pointer, so no cheap check can tell that a
# cached copy went stale (a cache keyed on them trained on the previous step's weights). The
# cat is a few MB per forward, nothing beside the GEMMs it feeds. Frozen weights (no parameter
# requires grad: the frame Q-Former) change only by loading, which does bump the version, so
# those are concatenated once and reused. The concatenation stays on the autograd graph (cat
# and cast save no tensors), and the cache lives outside the module so deepcopy and state
# dicts never see it.
_FUSED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _concat(params, dt: torch.dtype) -> torch.Tensor:
    return torch.cat([p.to(dt) for p in params]) if len(params) > 1 else params[0].to(dt)


def fused_weight(owner: torch.nn.Module, name: str, params, dt: torch.dtype) -> torch.Tensor:
    params = list(params)
    if any(p.requires_grad for p in params) or (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        # trainable (see above), or inside a CUDA graph, where the concatenation must be part
        # of the graph so that a replay after an optimizer step reads the updated weights
        return _concat(params, dt)
    mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), dt)
    sig = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
    cache = _FUSED.setdefault(owner, {})
    hit = cache.get((name, mode))
    if hit is not None and hit[0] == sig:
        return hit[1]
    w = _concat(params, dt)
    cache[(name, mode)] = (sig, w)
    return w


def num_heads(attn_self) -> int:
    """Heads of a self-attention module: ours (`num_heads`) or BERT's (`num_attention_heads`)."""
    h = getattr(attn_self, "num_heads", None) or getattr(attn_self, "num_attention_heads", None)
    if not isinstance(h, int):
        raise AttributeError(f"{type(attn_self).__name__} has no head count")
    return h


def cross_layers(bert):
    return [l for l in bert.encoder.layer if getattr(l, "crossattention", None) is not None]


def fast_bert_forward(bert, query_embeds, encoder_hidden_states, encoder_attention_mask=None,
                      attention_mask=None, encoder_pe=None, rows_per_pos: int = 1, num_pos: int = 1):
    """The query path of a BLIP-2 BERT Q-Former (release attribute layout) on the kernels;
    returns the last hidden state. `encoder_pe` (P, width) adds encoder_pe[(r // rows_per_pos)
    % num_pos] to encoder row r inside the key/value GEMM (the temporal position encoding)."""
    dt = compute_dtype(query_embeds)
    training = bert.training
    emb = bert.embeddings
    ln = emb.LayerNorm
    h = F.dropout(F.layer_norm(query_embeds.to(dt), ln.normalized_shape, ln.weight.to(dt), ln.bias.to(dt), ln.eps),
                  emb.dropout.p, training)
    enc_mask = None if encoder_attention_mask is None else key_mask_plan(encoder_attention_mask)
    self_mask = None if attention_mask is None else key_mask_plan(attention_mask)
    # K and V of every cross-attention layer in one launch over the encoder states.
    layers = cross_layers(bert)
    selfs = [l.crossattention.self for l in layers]
    kv = iter(())
    if layers:
        wk = fused_weight(bert, "wk", (s.key.weight for s in selfs), dt)
        bk = fused_weight(bert, "bk", (s.key.bias for s in selfs), dt)
        wv = fused_weight(bert, "wv", (s.value.weight for s in selfs), dt)
        bv = fused_weight(bert, "bv", (s.value.bias for s in selfs), dt)
        states = encoder_hidden_states
        if encoder_pe is None:  # no position embedding: a zero row keeps one kernel for both cases
            encoder_pe, rows_per_pos, num_pos = states.new_zeros(1, states.shape[-1]), 1, 1
        k, v = kv_proj_pe(states.to(dt), encoder_pe.to(dt), rows_per_pos, num_pos, wk, bk, wv, bv,
                          None if enc_mask is None else enc_mask.keys)
        n = len(layers)
        kv = iter(zip(_SplitLast.apply(k, n), _SplitLast.apply(v, n)) if n > 1 else [(k, v)])
    for i, layer in enumerate(bert.encoder.layer):
        sa = layer.attention.self
        heads = num_heads(sa)
        w = fused_weight(sa, "qkv", (sa.query.weight, sa.key.weight, sa.value.weight), dt)
        b = fused_weight(sa, "qkv_bias", (sa.query.bias, sa.key.bias, sa.value.bias), dt)
        q, k, v = _flat_linear(linear, h, w, b).chunk(3, dim=-1)
        ctx = attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), self_mask,
                        sa.dropout.p, None, training)
        h = _output_block(layer.attention.output, _context(ctx), h, training, dt)
        if getattr(layer, "crossattention", None) is not None:
            ca = layer.crossattention.self
            ck, cv = next(kv)
            q = _flat_linear(linear, h, ca.query.weight.to(dt), ca.query.bias.to(dt))
            ctx = attention(_heads(q, heads), _heads(ck, heads), _heads(cv, heads), enc_mask,
                            ca.dropout.p, None, training)
            h = _output_block(layer.crossattention.output, _context(ctx), h, training, dt)
        dense = layer.intermediate_query.dense
        inter = _flat_linear(linear_gelu, h, dense.weight.to(dt), dense.bias.to(dt))
        h = _output_block(layer.output_query, inter, h, training, dt)
    return h


class _SplitLast(torch.autograd.Function):
    """The K (or V) of each cross-attention layer as views of the one projection output.
    Backward concatenates the layers' gradients in one pass, where slicing would zero a full
    gradient per layer, copy into it and add them up."""

    @staticmethod
    def forward(ctx, t, n):
        ctx.n = n
        return tuple(t.chunk(n, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        ref = next(g for g in grads if g is not None)
        grads = [g if g is not None else torch.zeros_like(ref) for g in grads]
        return torch.cat(grads, dim=-1), None


def _add_pe(states, encoder_pe, rows_per_pos, num_pos):
    if encoder_pe is None:
        return states
    idx = (torch.arange(states.shape[1], device=states.device) // rows_per_pos) % num_pos
    return states + encoder_pe[idx]


class FastQFormerBert(QFormerBert):
    _fastground_original = QFormerBert

    def forward(self, query_embeds, encoder_hidden_states, encoder_attention_mask=None, attention_mask=None,
                return_dict: bool = True, encoder_pe=None, rows_per_pos: int = 1, num_pos: int = 1):
        """As QFormerBert.forward; `encoder_pe` (P, width) adds encoder_pe[(r // rows_per_pos) % num_pos]
        to encoder row r inside the key/value GEMM (the temporal position encoding)."""
        params = [p for p in self.parameters()][:1]
        if not triton_or_warn(query_embeds, encoder_hidden_states, *params):
            states = _add_pe(encoder_hidden_states, encoder_pe, rows_per_pos, num_pos)
            return super().forward(query_embeds, states, encoder_attention_mask, attention_mask, return_dict)
        h = fast_bert_forward(self, query_embeds, encoder_hidden_states, encoder_attention_mask, attention_mask,
                              encoder_pe, rows_per_pos, num_pos)
        return QFormerOutput(h) if return_dict else (h,)


# --------------------------------------------------------------------------- foreign classes
# Arguments of the release's BertModel.forward that the fast query path implements; any other
# argument given a non-default value (input_ids: the text path; head_mask, past_key_values,
# output_attentions, ...) runs the module's own forward.
_FAST_ARGS = {"self", "query_embeds", "encoder_hidden_states", "encoder_attention_mask", "attention_mask",
              "return_dict", "kwargs"}
_HARMLESS = {"use_cache": (None, False), "output_attentions": (None, False), "output_hidden_states": (None, False),
             "is_decoder": (False,), "input_ids": (None,), "position_ids": (None,), "head_mask": (None,),
             "past_key_values": (None,), "encoder_pe": (None,)}


class _FastForeignBert:
    """Mixin of the fast class made for a BERT Q-Former of another class (the release's own
    BertModel, a transformers-based one): same attributes, forward on the kernels."""

    _fastground_original: type

    def forward(self, *args, **kwargs):
        orig = type(self)._fastground_original
        try:
            bound = inspect.signature(orig.forward).bind(self, *args, **kwargs)
        except TypeError:
            return orig.forward(self, *args, **kwargs)
        a = dict(bound.arguments)
        a.update(a.pop("kwargs", {}) or {})
        pe = a.pop("encoder_pe", None)
        rows_per_pos, num_pos = a.pop("rows_per_pos", 1), a.pop("num_pos", 1)
        other = {k: v for k, v in a.items() if k not in _FAST_ARGS}
        plain = all(k in _HARMLESS and (v is None or any(v is d for d in _HARMLESS[k])) for k, v in other.items())
        q, states = a.get("query_embeds"), a.get("encoder_hidden_states")
        params = [p for p in self.parameters()][:1]
        if not plain or q is None or states is None or not triton_or_warn(q, states, *params):
            if pe is not None:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("encoder_pe", "rows_per_pos", "num_pos")}
                kwargs["encoder_hidden_states"] = _add_pe(states, pe, rows_per_pos, num_pos)
            return orig.forward(self, *args, **kwargs)
        h = fast_bert_forward(self, q, states, a.get("encoder_attention_mask"), a.get("attention_mask"),
                              pe, rows_per_pos, num_pos)
        if a.get("return_dict") is False:
            return (h, None)
        return _model_output(h)


def _model_output(h):
    try:
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
    except ImportError:  # pragma: no cover - transformers is a dependency
        return QFormerOutput(h)
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h)


_FAST_CLASSES: dict[type, type] = {}


def fast_class_for(cls: type) -> type:
    """The fast class a BERT Q-Former body of class `cls` is switched to."""
    if issubclass(cls, QFormerBert):
        return FastQFormerBert if cls is QFormerBert else _FAST_CLASSES.setdefault(
            cls, type("Fast" + cls.__name__, (FastQFormerBert, cls), {"_fastground_original": cls}))
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type("Fast" + cls.__name__, (_FastForeignBert, cls), {"_fastground_original": cls})
    return _FAST_CLASSES[cls]


class FastQFormer(QFormer):
    _fastground_original = QFormer


def to_fast(q: QFormer) -> QFormer:
    q.__class__ = FastQFormer
    q.bert.__class__ = FastQFormerBert
    return q


def to_reference(q: QFormer) -> QFormer:
    q.__class__ = QFormer
    q.bert.__class__ = QFormerBert
    return q

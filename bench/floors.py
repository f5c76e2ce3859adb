"""FLOP and byte counts of the benchmarked pieces, for their time floors.

Pure functions of shapes: no torch, no device. A case's floor is
``max(flops / matmul_rate, bytes / copy_bandwidth)`` with both ceilings measured in the
same run (see ``bench/harness.py``).

Conventions (a floor is a lower bound, so everything here is what *must* happen):

* FLOPs are matrix-product FLOPs only, 2*M*N*K per product. Softmax, GELU, LayerNorm,
  residual adds and the optimizer update are elementwise and cost well under 1% of the
  products at these shapes; leaving them out keeps the floor a floor.
* Bytes: every input of a pass is read once and every output written once; intermediates
  of a pass are free (a perfectly fused pass keeps them on chip). Forward and backward are
  separate passes (autograd returns to the caller between them), so a backward re-reads
  the inputs and parameters it needs, reads the output gradient and writes the gradients.
* Backward FLOPs: a linear layer costs dX = 2MNK when its input needs a gradient and
  dW = 2MNK when its weight trains. Attention backward is the four products dV, dP, dQ, dK
  (twice the forward); recomputing the scores, as FlashAttention does, is not required.
* Frozen inputs (CLIP, EVA+Q-Former, ImageBind features) need no gradient. The video and
  audio branches add a *trainable* position embedding to those features, so a gradient
  must reach the embedding rows. Because the key/value projections are linear, the sum
  over batch and queries that the embedding gradient is can be taken before the product,
  leaving a (rows x width) product per projection instead of one over every key
  (``pe_rows`` below). The eager reference does the full product; the floor does not.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)

    def floor_s(self, flops_per_s: float, bytes_per_s: float) -> float:
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)

    def bound(self, flops_per_s: float, bytes_per_s: float) -> str:
        """Which ceiling sets the floor: "compute" or "memory"."""
        return "compute" if self.flops / flops_per_s >= self.bytes / bytes_per_s else "memory"


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


# ---------------------------------------------------------------------------- linear
def linear(m: int, n: int, k: int, *, bias: bool = False, itemsize: int = 2, backward: bool = False,
           input_grad: bool = True, weight_grad: bool = True) -> Cost:
    """y (m, n) = x (m, k) @ W(n, k)^T (+ b), as one op (and its backward as one op)."""
    w = n * k + (n if bias else 0)
    flops = matmul_flops(m, n, k)
    elems = m * k + w + m * n
    if backward:
        if input_grad:
            flops += matmul_flops(m, k, n)
            elems += n * k + m * k          # read W, write dX
        if weight_grad:
            flops += matmul_flops(n, k, m)
            elems += m * k + w              # read X, write dW (and db)
        elems += m * n                      # read dY
    return Cost(flops, elems * itemsize)


# ---------------------------------------------------------------------------- attention
def causal_pairs(s_q: int, s_k: int) -> int:
    """(query, key) pairs a causal mask keeps, queries aligned to the end of the keys
    (query i sees keys up to s_k - s_q + i)."""
    off = s_k - s_q
    if off >= 0:
        return s_q * off + s_q * (s_q + 1) // 2
    return s_k * (s_k + 1) // 2


def attention(b: int, heads: int, s_q: int, s_k: int, head_dim: int, *, causal: bool = False,
              itemsize: int = 2, backward: bool = False) -> Cost:
    """softmax(Q K^T / sqrt(d)) V on (b, heads, s, head_dim) tensors."""
    pairs = causal_pairs(s_q, s_k) if causal else s_q * s_k
    fwd = 4 * b * heads * pairs * head_dim              # QK^T and PV
    q, kv = b * heads * s_q * head_dim, b * heads * s_k * head_dim
    lse = b * heads * s_q * 4                           # fp32 row statistics kept for backward
    nbytes = (2 * q + 2 * kv) * itemsize + (lse if backward else 0)
    flops = fwd
    if backward:
        flops += 2 * fwd                                # dV, dP, dQ, dK
        nbytes += (3 * q + 2 * kv) * itemsize + lse     # read q, o, dO, k, v, lse
        nbytes += (q + 2 * kv) * itemsize               # write dq, dk, dv
    return Cost(flops, nbytes)


# ---------------------------------------------------------------------------- Q-Former branches
@dataclass(frozen=True)
class QFormerShape:
    """A video/audio Q-Former (cross-attention in every layer) and its projection."""
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    layers: int = 2
    encoder_width: int = 768
    queries: int = 64
    out_features: int = 4096        # llama_proj / audio_llama_proj


def qformer_layer_params(s: QFormerShape) -> int:
    h, e, i = s.hidden, s.encoder_width, s.intermediate
    self_attn = 4 * (h * h + h) + 2 * h
    cross = 2 * (h * h + h) + 2 * (e * h + h) + 2 * h
    ffn = (h * i + i) + (i * h + h) + 2 * h
    return self_attn + cross + ffn


def qformer_branch_params(s: QFormerShape, pe_rows: int) -> int:
    """Trainable parameters a branch call touches: position-embedding rows, query tokens,
    embeddings LayerNorm, the layers and the output projection."""
    return (pe_rows * s.encoder_width + s.queries * s.hidden + 2 * s.hidden
            + s.layers * qformer_layer_params(s) + s.hidden * s.out_features + s.out_features)


def _qformer_flops(b: int, keys: int, s: QFormerShape, backward: bool, pe_rows: int) -> int:
    h, e, i, nq = s.hidden, s.encoder_width, s.intermediate, s.queries
    query_linears = (matmul_flops(b * nq, h, h) * 4           # self q, k, v, o
                     + matmul_flops(b * nq, h, h) * 2         # cross q, o
                     + matmul_flops(b * nq, i, h) + matmul_flops(b * nq, h, i))
    attn = 4 * b * nq * nq * h + 4 * b * nq * keys * h        # self and cross QK^T, PV
    kv_proj = 2 * matmul_flops(b * keys, h, e)
    per_layer = query_linears + attn + kv_proj
    if backward:
        per_layer += 2 * query_linears + 2 * attn + kv_proj    # dX+dW; 4 attention products; dW of K/V
        per_layer += 2 * matmul_flops(pe_rows, e, h)           # the reduced gradient reaching the PE
    flops = s.layers * per_layer + matmul_flops(b * nq, s.out_features, h)
    if backward:
        flops += 2 * matmul_flops(b * nq, s.out_features, h)
    return flops


def qformer_branch(b: int, keys_per_item: int, s: QFormerShape, *, pe_rows: int, itemsize: int = 2,
                   backward: bool = False) -> Cost:
    """Position encoding + Q-Former + projection, from frozen features (b, keys, width)."""
    feats = b * keys_per_item * s.encoder_width
    params = qformer_branch_params(s, pe_rows)
    out = b * s.queries * s.out_features
    elems = feats + params + out
    if backward:
        elems += out + feats + params + params                 # dY, re-read feats and params, write grads
    return Cost(_qformer_flops(b, keys_per_item, s, backward, pe_rows), elems * itemsize)


def video_branch(b: int, frames: int = 64, queries_per_frame: int = 32, s: QFormerShape = QFormerShape(), *,
                 itemsize: int = 2, backward: bool = False) -> Cost:
    """frame features (b, frames, queries_per_frame, 768) -> (b, video_token_len, 4096)."""
    return qformer_branch(b, frames * queries_per_frame, s, pe_rows=frames, itemsize=itemsize,
                          backward=backward)


AUDIO_QFORMER = QFormerShape(encoder_width=1024, queries=8)


def audio_branch(b: int, clips: int = 3, s: QFormerShape = AUDIO_QFORMER, *, itemsize: int = 2,
                 backward: bool = False) -> Cost:
    """clip features (b, clips, 1024) -> (b, sound_token_len, 4096)."""
    return qformer_branch(b, clips, s, pe_rows=clips, itemsize=itemsize, backward=backward)


# ---------------------------------------------------------------------------- image adapter
def adapter_params(d_in: int = 1024, d_hidden: int = 4096, d_out: int = 4096) -> int:
    return d_in * d_hidden + d_hidden + d_hidden * d_out + d_out


def image_adapter(tokens: int, d_in: int = 1024, d_hidden: int = 4096, d_out: int = 4096, *,
                  itemsize: int = 2, backward: bool = False) -> Cost:
    """Linear(d_in, d_hidden) -> GELU -> Linear(d_hidden, d_out) on frozen CLIP tokens."""
    fc1, fc2 = matmul_flops(tokens, d_hidden, d_in), matmul_flops(tokens, d_out, d_hidden)
    params = adapter_params(d_in, d_hidden, d_out)
    flops = fc1 + fc2
    elems = tokens * d_in + params + tokens * d_out
    if backward:
        flops += fc1 + 2 * fc2                       # dW1 (no dX: CLIP is frozen); dX2 and dW2
        elems += tokens * d_out + tokens * d_in + params + params
    return Cost(flops, elems * itemsize)


# ---------------------------------------------------------------------------- Llama decoder
@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def decoder_layer_params(s: LlamaShape) -> int:
    h, kv = s.hidden, s.kv_heads * s.head_dim
    return 2 * h * h + 2 * h * kv + 3 * h * s.intermediate + 2 * h


def decoder_layer(b: int, seq: int, s: LlamaShape = LlamaShape(), *, itemsize: int = 2, backward: bool = False,
                  weight_grad: bool = True, causal: bool = True) -> Cost:
    """One Llama decoder layer (RMSNorm, attention with RoPE, SwiGLU MLP) on (b, seq, hidden)."""
    t, h, kv = b * seq, s.hidden, s.kv_heads * s.head_dim
    linear_fwd = (2 * matmul_flops(t, h, h) + 2 * matmul_flops(t, kv, h)
                  + 2 * matmul_flops(t, s.intermediate, h) + matmul_flops(t, h, s.intermediate))
    att = attention(b, s.heads, seq, seq, s.head_dim, causal=causal, itemsize=itemsize, backward=backward)
    params = decoder_layer_params(s)
    flops = linear_fwd + att.flops
    # Attention's q/k/v/o live inside the layer: only the layer's input, output and
    # weights have to cross memory (plus attention's row statistics when training).
    elems = 2 * t * h + params
    extra = 0
    if backward:
        flops += linear_fwd * (2 if weight_grad else 1)
        elems += t * h + t * h + params + t * h + (params if weight_grad else 0)  # dY, x, W, dX, dW
        extra = s.heads * b * seq * 4
    return Cost(flops, elems * itemsize + extra)


def lm_head_loss(tokens: int, s: LlamaShape = LlamaShape(), *, itemsize: int = 2, backward: bool = False,
                 weight_grad: bool = True) -> Cost:
    """lm_head product and cross-entropy over every position (logits need not be stored)."""
    flops = matmul_flops(tokens, s.vocab, s.hidden)
    elems = tokens * s.hidden + s.vocab * s.hidden
    label_bytes = tokens * 8
    if backward:
        flops += matmul_flops(tokens, s.hidden, s.vocab) * (2 if weight_grad else 1)
        elems += tokens * s.hidden + s.vocab * s.hidden + tokens * s.hidden + (s.vocab * s.hidden if weight_grad else 0)
        label_bytes *= 2
    return Cost(flops, elems * itemsize + label_bytes)


def adamw_bytes(n_params: int, param_itemsize: int = 2, state_itemsize: int = 2) -> int:
    """One AdamW update: read p, g, m, v; write p, m, v."""
    return n_params * (3 * param_itemsize + 4 * state_itemsize)


# ---------------------------------------------------------------------------- training step
@dataclass(frozen=True)
class SliceShape:
    """The benchmarked 7B-wide slice: every trainable branch plus a few decoder layers."""
    llama: LlamaShape = LlamaShape()
    layers: int = 2
    image_tokens: int = 576
    clip_width: int = 1024
    frames: int = 64
    queries_per_frame: int = 32
    video: QFormerShape = QFormerShape()
    clips: int = 3
    audio: QFormerShape = AUDIO_QFORMER
    video_pe_rows: int = 64         # max_frame: the optimizer updates the whole table
    audio_pe_rows: int = 8          # audio_position_embeddings


def slice_params(s: SliceShape, stage: int) -> int:
    """Parameters the optimizer updates in a stage (1: adapters; 2, 3: adapters + LLM)."""
    adapters = (adapter_params(s.clip_width, s.llama.hidden, s.llama.hidden)
                + qformer_branch_params(s.video, s.video_pe_rows) + qformer_branch_params(s.audio, s.audio_pe_rows))
    if stage == 1:  # the adapters and, as released, the input embeddings
        return adapters + s.llama.vocab * s.llama.hidden
    lm = s.layers * decoder_layer_params(s.llama) + 2 * s.llama.vocab * s.llama.hidden + s.llama.hidden
    return adapters + lm


def train_step(b: int, seq: int, s: SliceShape = SliceShape(), *, stage: int = 3, itemsize: int = 2,
               state_itemsize: int = 2) -> Cost:
    """Forward, backward and AdamW update of the slice on b samples of seq tokens, each
    sample carrying one image, one video and one sound."""
    llm_trains = stage >= 2
    h, t = s.llama.hidden, b * seq
    cost = image_adapter(b * s.image_tokens, s.clip_width, h, h, itemsize=itemsize, backward=True)
    cost += video_branch(b, s.frames, s.queries_per_frame, s.video, itemsize=itemsize, backward=True)
    cost += audio_branch(b, s.clips, s.audio, itemsize=itemsize, backward=True)
    for _ in range(s.layers):
        cost += decoder_layer(b, seq, s.llama, itemsize=itemsize, backward=True, weight_grad=llm_trains)
    cost += lm_head_loss(t, s.llama, itemsize=itemsize, backward=True, weight_grad=llm_trains)
    # token ids in, embedding rows gathered and (training the LLM) their gradient scattered
    emb = t * 8 + t * h * itemsize + (t * h * itemsize + s.llama.vocab * h * itemsize if llm_trains else 0)
    opt = adamw_bytes(slice_params(s, stage), itemsize, state_itemsize)
    return cost + Cost(0, emb + opt)

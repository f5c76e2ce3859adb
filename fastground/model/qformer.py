"""BLIP-2 Q-Former (the BERT variant with query-only feed-forward), reference path.

Module and parameter names follow the release (`bert.embeddings.LayerNorm`,
`bert.encoder.layer.N.attention.self.query`, `...crossattention...`,
`...intermediate_query.dense`, `...output_query.LayerNorm`), so release checkpoints load
as they are. Only the query path exists: the release sets the text feed-forward, the word
and position embeddings and the LM head to None in all three Q-Formers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastground.model.layers import init_linear_and_norm


@dataclass
class QFormerSpec:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class QFormerOutput:
    last_hidden_state: torch.Tensor


def extended_key_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, Lk) 1/0 mask -> additive (B, 1, 1, Lk) bias, as transformers' invert_attention_mask."""
    if mask is None:
        return None
    m = mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


class QFormerSelfAttention(nn.Module):
    def __init__(self, spec: QFormerSpec, is_cross: bool):
        super().__init__()
        kv_width = spec.encoder_width if is_cross else spec.hidden_size
        self.num_heads = spec.num_heads
        self.head_dim = spec.head_dim
        self.query = nn.Linear(spec.hidden_size, spec.hidden_size)
        self.key = nn.Linear(kv_width, spec.hidden_size)
        self.value = nn.Linear(kv_width, spec.hidden_size)
        self.dropout = nn.Dropout(spec.attention_dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = self._heads(self.query(hidden))
        k = self._heads(self.key(kv))
        v = self._heads(self.value(kv))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        probs = self.dropout(scores.softmax(dim=-1))
        ctx = (probs @ v).transpose(1, 2).flatten(2)
        return ctx


class QFormerSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, spec: QFormerSpec, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_features or spec.hidden_size, spec.hidden_size)
        self.LayerNorm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.dropout = nn.Dropout(spec.hidden_dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, spec: QFormerSpec, is_cross: bool = False):
        super().__init__()
        self.self = QFormerSelfAttention(spec, is_cross)
        self.output = QFormerSelfOutput(spec)

    def forward(self, hidden, kv=None, bias=None):
        ctx = self.self(hidden, hidden if kv is None else kv, bias)
        return self.output(ctx, hidden)


class QFormerIntermediate(nn.Module):
    """dense -> exact (erf) GELU, BERT's hidden_act="gelu"."""

    def __init__(self, spec: QFormerSpec):
        super().__init__()
        self.dense = nn.Linear(spec.hidden_size, spec.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, spec: QFormerSpec, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(spec)
        self.has_cross_attention = layer_idx % spec.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(spec, is_cross=True)
        self.intermediate_query = QFormerIntermediate(spec)
        self.output_query = QFormerSelfOutput(spec, in_features=spec.intermediate_size)

    def forward(self, hidden, self_bias, encoder_states, encoder_bias):
        hidden = self.attention(hidden, None, self_bias)
        if self.has_cross_attention:
            hidden = self.crossattention(hidden, encoder_states, encoder_bias)
        return self.output_query(self.intermediate_query(hidden), hidden)


class QFormerEmbeddings(nn.Module):
    """Queries only: LayerNorm -> dropout. position_ids is kept as the release's persistent
    buffer so release checkpoints load without unexpected keys."""

    def __init__(self, spec: QFormerSpec):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.dropout = nn.Dropout(spec.hidden_dropout)
        self.register_buffer("position_ids", torch.arange(spec.max_position_embeddings).expand(1, -1).clone(),
                             persistent=True)

    def forward(self, query_embeds):
        return self.dropout(self.LayerNorm(query_embeds))


class QFormerEncoder(nn.Module):
    def __init__(self, spec: QFormerSpec):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(spec, i) for i in range(spec.num_layers))


class QFormerBert(nn.Module):
    def __init__(self, spec: QFormerSpec):
        super().__init__()
        self.spec = spec
        self.embeddings = QFormerEmbeddings(spec)
        self.encoder = QFormerEncoder(spec)

    def forward(self, query_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, attention_mask=None,
                return_dict: bool = True):
        hidden = self.embeddings(query_embeds)
        self_bias = extended_key_mask(attention_mask, hidden.dtype)
        enc_bias = extended_key_mask(encoder_attention_mask, hidden.dtype)
        for layer in self.encoder.layer:
            hidden = layer(hidden, self_bias, encoder_hidden_states, enc_bias)
        return QFormerOutput(hidden) if return_dict else (hidden,)


class QFormer(nn.Module):
    """Holder with the release's `.bert` attribute (the release builds a BertLMHeadModel
    and strips everything but the query path)."""

    def __init__(self, spec: QFormerSpec):
        super().__init__()
        self.spec = spec
        self.bert = QFormerBert(spec)

    def forward(self, *args, **kwargs):
        return self.bert(*args, **kwargs)


def init_qformer_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    init_linear_and_norm(module, std, truncated=False)

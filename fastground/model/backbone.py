"""The Vicuna/Llama backbone: transformers' Llama with the attention backend chosen here.

On GPU: FlashAttention-2 through `flash_attn` when it imports, else torch's bundled
FlashAttention-2 varlen kernel (fastground.model.varlen). On CPU: torch's
scaled_dot_product_attention. The choice is logged once so users know which backend ran.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import LlamaConfig

from fastground.config import GroundingGPTConfig
from fastground.model import varlen

varlen.register()

log = logging.getLogger("fastground")
_announced: set[str] = set()


def pick_attention_backend(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if varlen.available():
        return varlen.NAME
    return "sdpa"


def announce_backend(backend: str) -> None:
    if backend in _announced:
        return
    _announced.add(backend)
    where = "GPU" if torch.cuda.is_available() else "CPU"
    detail = {
        "flash_attention_2": "flash_attn (FlashAttention-2)",
        "sdpa": "torch scaled_dot_product_attention"
                + (" (FlashAttention-2 kernels)" if where == "GPU" else " (CPU kernel)"),
        "eager": "eager softmax(QK^T)V",
        varlen.NAME: "torch.nn.attention.varlen (bundled FlashAttention-2)",
    }.get(backend, backend)
    log.info("backbone attention: %s on %s", detail, where)


def llama_config(cfg: GroundingGPTConfig) -> LlamaConfig:
    backend = pick_attention_backend(cfg.attn_implementation)
    lc = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        attention_bias=False,
        use_cache=False,
    )
    lc._attn_implementation = backend
    return lc

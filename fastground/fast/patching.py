"""Swap a model's reference modules for the fast ones in place, and back.

    fastground.patch(model)     # Q-Formers, adapters, the video/audio branches, Llama layers
    fastground.unpatch(model)

Swapping changes the class of each module (the fast classes add no state), so the
parameters stay the same objects: the state dict is bit-identical, an optimizer built before
the patch keeps working, and checkpoints load either way. Works on a GroundingGPT, its inner
GroundingGPTModel, or any module holding reference QFormers / adapters under the release's
names.
"""
from __future__ import annotations

import types

from torch import nn

from fastground.fast.adapters import FastLinear, FastMLPAdapter
from fastground.fast.branches import fast_audio_branch, fast_video_branch
from fastground.fast.qformer import FastQFormer, to_fast, to_reference
from fastground.model.branches import fast_swaps
from fastground.model.qformer import QFormer

QFORMERS = fast_swaps("qformer")
PROJECTIONS = fast_swaps("linear")
(MLP_ADAPTER,) = fast_swaps("mlp_adapter")


def _inner(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "video_Qformer") else model


def is_patched(model: nn.Module) -> bool:
    return getattr(_inner(model), "_fastground_patched", False)


def patch(model: nn.Module, branches: bool = True, llama: bool = True) -> nn.Module:
    """branches: the Q-Formers, adapters and projections; llama: fused RMSNorm, RoPE and
    SwiGLU in the backbone's layers (fastground.fast.llama)."""
    inner = _inner(model)
    if llama:
        from fastground.fast.llama import patch_llama
        patch_llama(model)
    if not branches or is_patched(model):
        return model
    for name in QFORMERS:
        q = getattr(inner, name, None)
        if isinstance(q, QFormer):
            to_fast(q)
    for name in PROJECTIONS:
        m = getattr(inner, name, None)
        if type(m) is nn.Linear:
            m.__class__ = FastLinear
    m = getattr(inner, MLP_ADAPTER, None)
    if type(m) is nn.Sequential and len(m) == 3 and isinstance(m[0], nn.Linear) and isinstance(m[1], nn.GELU):
        m.__class__ = FastMLPAdapter
    if isinstance(getattr(inner, "video_Qformer", None), FastQFormer):
        inner.video_branch = types.MethodType(fast_video_branch, inner)
    if isinstance(getattr(inner, "audio_Qformer", None), FastQFormer):
        inner.audio_branch = types.MethodType(fast_audio_branch, inner)
    inner._fastground_patched = True
    return model


def unpatch(model: nn.Module) -> nn.Module:
    inner = _inner(model)
    from fastground.fast.llama import unpatch_llama
    unpatch_llama(model)
    for name in QFORMERS:
        q = getattr(inner, name, None)
        if isinstance(q, FastQFormer):
            to_reference(q)
    for name in PROJECTIONS:
        m = getattr(inner, name, None)
        if type(m) is FastLinear:
            m.__class__ = nn.Linear
    m = getattr(inner, MLP_ADAPTER, None)
    if type(m) is FastMLPAdapter:
        m.__class__ = nn.Sequential
    for attr in ("video_branch", "audio_branch"):
        inner.__dict__.pop(attr, None)
    inner.__dict__.pop("_fastground_patched", None)
    return model

"""Swap a model's reference modules for the fast ones in place, and back.

    fastground.patch(model)               # Q-Formers, adapters, the video/audio branches, Llama layers
    fastground.patch(model, strict=True)  # raise instead of warning about what cannot be swapped
    fastground.unpatch(model)

Modules are recognised by structure, whatever their class, so the release's own code (its
BERT Q-Former classes, `LEGOLlamaModel`) and transformers-built Q-Formers are patched too:

* a BLIP-2 BERT Q-Former body: `embeddings.LayerNorm`, `encoder.layer[i].attention.self.
  {query,key,value}`, `...attention.output.{dense,LayerNorm}`, optional `...crossattention.*`,
  `...intermediate_query.dense` with an exact GELU and `...output_query.*`;
* the adapters by their release names: `mm_vision_projector` (Linear -> GELU -> Linear, or one
  Linear), `llama_proj` and `audio_llama_proj` (Linear).

Swapping changes the class of each module to a fast subclass that adds no state, so the
parameters stay the same objects: the state dict is bit-identical, an optimizer built before
the patch keeps working, and checkpoints load either way. Anything that looks like one of these
but cannot be swapped (another activation, a wrapped Linear, a missing part) is named in one
warning and left on its own code; with strict=True nothing is changed and PatchError says why.
`unpatch` restores every original class.
"""
from __future__ import annotations

import types
import warnings

from torch import nn

from fastground.fast.adapters import FastLinear, FastMLPAdapter
from fastground.fast.branches import fast_audio_branch, fast_video_branch
from fastground.fast.qformer import FastQFormer, fast_class_for, num_heads
from fastground.model.branches import fast_swaps
from fastground.model.qformer import QFormer

QFORMERS = fast_swaps("qformer")
PROJECTIONS = fast_swaps("linear")
(MLP_ADAPTER,) = fast_swaps("mlp_adapter")


class PatchError(RuntimeError):
    """patch(strict=True) found modules it cannot swap."""


def _inner(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "video_Qformer") else model


def is_patched(model: nn.Module) -> bool:
    return getattr(_inner(model), "_fastground_patched", False)


# --------------------------------------------------------------------------- recognition
def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def looks_like_qformer(m: nn.Module) -> bool:
    """A BERT body whose layers have the release's `attention.self.query` layout."""
    layers = _get(m, "encoder.layer")
    return (isinstance(layers, nn.ModuleList) and len(layers) > 0 and _get(m, "embeddings") is not None
            and isinstance(_get(layers[0], "attention.self.query"), nn.Linear))


def _exact_gelu(intermediate: nn.Module) -> bool:
    act = getattr(intermediate, "intermediate_act_fn", None)
    if act is None:  # fastground's reference QFormerIntermediate: F.gelu in its forward
        return type(intermediate).__name__ == "QFormerIntermediate"
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    # transformers' GELUActivation wraps F.gelu (hidden_act="gelu"); the release's ACT2FN too
    fn = getattr(act, "act", act)
    import torch.nn.functional as F
    return fn is F.gelu and type(act).__name__ in ("GELUActivation", "builtin_function_or_method", "function")


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) and m.bias is not None


def qformer_problems(m: nn.Module) -> list[str]:
    """Why this Q-Former body cannot run on the kernels (empty: it can)."""
    out = []
    ln = _get(m, "embeddings.LayerNorm")
    if not isinstance(ln, nn.LayerNorm) or not isinstance(_get(m, "embeddings.dropout"), nn.Dropout):
        out.append("embeddings lack LayerNorm/dropout")
        return out
    width = ln.normalized_shape[-1]
    enc_width = None
    for i, layer in enumerate(m.encoder.layer):
        where = f"layer {i}"
        parts = [("attention", False)]
        if getattr(layer, "crossattention", None) is not None:
            parts.append(("crossattention", True))
        for name, cross in parts:
            sa = _get(layer, f"{name}.self")
            lin = [_get(sa, n) for n in ("query", "key", "value")] if sa is not None else []
            if len(lin) != 3 or not all(_is_linear(l) for l in lin):
                out.append(f"{where} {name}.self.query/key/value are not Linear layers with bias")
                continue
            if not isinstance(getattr(sa, "dropout", None), nn.Dropout):
                out.append(f"{where} {name}.self.dropout is not nn.Dropout")
            try:
                heads = num_heads(sa)
            except AttributeError:
                out.append(f"{where} {name}.self has no head count")
                continue
            if width % heads or width // heads > 128 or lin[0].out_features != width:
                out.append(f"{where} {name}: width {lin[0].out_features} / {heads} heads unsupported")
            if getattr(sa, "position_embedding_type", "absolute") != "absolute":
                out.append(f"{where} {name}: relative position scores are not fused")
            if cross:
                if enc_width not in (None, lin[1].in_features):
                    out.append(f"{where} crossattention: encoder width {lin[1].in_features} differs from {enc_width}")
                enc_width = lin[1].in_features
            out += _output_problems(layer, f"{name}.output", where)
        dense = _get(layer, "intermediate_query.dense")
        if not _is_linear(dense):
            out.append(f"{where} has no query feed-forward intermediate_query.dense")
        elif not _exact_gelu(layer.intermediate_query):
            out.append(f"{where} intermediate_query activation is not the exact (erf) GELU")
        out += _output_problems(layer, "output_query", where)
    return out


def _output_problems(layer, path, where) -> list[str]:
    block = _get(layer, path)
    ok = (block is not None and _is_linear(getattr(block, "dense", None))
          and isinstance(getattr(block, "LayerNorm", None), nn.LayerNorm)
          and isinstance(getattr(block, "dropout", None), nn.Dropout))
    return [] if ok else [f"{where} {path} is not dense -> dropout -> LayerNorm(x + residual)"]


def _adapter_plan(name: str, m: nn.Module):
    """(new class, None) to swap, (None, reason) to refuse, (None, None) when already fast."""
    if isinstance(m, (FastLinear, FastMLPAdapter)):
        return None, None
    if type(m) is nn.Linear:
        return FastLinear, None
    if name == MLP_ADAPTER and type(m) is nn.Sequential:
        if (len(m) == 3 and type(m[0]) is nn.Linear and type(m[2]) is nn.Linear and type(m[1]) is nn.GELU
                and m[1].approximate == "none"):
            return FastMLPAdapter, None
        return None, "is not Linear -> exact GELU -> Linear"
    return None, f"is a {type(m).__name__}, not a plain nn.Linear"


def plan(model: nn.Module) -> tuple[list[tuple[str, nn.Module, type]], list[tuple[str, str]]]:
    """What patch would do: [(name, module, fast class)] and [(name, why not)]."""
    swaps, refused = [], []
    skip: tuple[str, ...] = ()
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        last = name.rsplit(".", 1)[-1]
        if looks_like_qformer(m):
            skip += (name + ".",)
            if getattr(type(m), "_fastground_original", None) is not None:
                continue  # already fast
            problems = qformer_problems(m)
            if problems:
                refused.append((name or type(m).__name__, "Q-Former: " + "; ".join(problems)))
            else:
                swaps.append((name, m, fast_class_for(type(m))))
        elif last in PROJECTIONS or last == MLP_ADAPTER:
            cls, why = _adapter_plan(last, m)
            if cls is not None:
                swaps.append((name, m, cls))
            elif why:
                refused.append((name, why))
    return swaps, refused


# --------------------------------------------------------------------------- patch / unpatch
def patch(model: nn.Module, branches: bool = True, llama: bool = True, strict: bool = False) -> nn.Module:
    """branches: the Q-Formers, adapters and projections; llama: fused RMSNorm, RoPE and
    SwiGLU in the backbone's layers (fastground.fast.llama). strict: raise PatchError, changing
    nothing, when a Q-Former or adapter cannot be swapped (else: one warning naming each)."""
    inner = _inner(model)
    if branches and not is_patched(model):
        swaps, refused = plan(model)
        if refused:
            lines = "\n".join(f"  {n}: {why}" for n, why in refused)
            msg = f"fastground.patch: {len(refused)} module(s) stay on their own (slow) code:\n{lines}"
            if strict:
                raise PatchError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if llama:
        from fastground.fast.llama import patch_llama
        patch_llama(model)
    if not branches or is_patched(model):
        return model
    for _, m, cls in swaps:
        m.__class__ = cls
    for name in QFORMERS:  # our own holders: the class the branches and reports look for
        q = getattr(inner, name, None)
        if type(q) is QFormer:
            q.__class__ = FastQFormer
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
    for m in model.modules():
        orig = type(m).__dict__.get("_fastground_original")
        if orig is not None and type(m) is not orig:
            m.__class__ = orig
    for attr in ("video_branch", "audio_branch"):
        inner.__dict__.pop(attr, None)
    inner.__dict__.pop("_fastground_patched", None)
    return model

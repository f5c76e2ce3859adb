"""What of the fast engine a training run uses, decided once at start-up and logged:
the Triton-fused branches and Llama ops (`fastground.patch`), packed batches, the fused
answer-only loss, and activation checkpointing picked from a memory estimate.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

log = logging.getLogger("fastground.train")

VARLEN_BACKENDS = ("flash_attention_2", "fastground_varlen")


def triton_runs() -> bool:
    """Whether Triton kernels run in this process (a CUDA device, or TRITON_INTERPRET=1): the
    runtime's decision, not a second one."""
    from fastground.fast.runtime import triton_usable
    return triton_usable()


def apply_fast_path(cfg, model, device: torch.device):
    """Patch the model as --fast-path / --fused-llama / --fused-loss say; returns the config
    with the defaults resolved."""
    from fastground.fast.patching import patch
    runs = triton_runs()
    fast = runs if cfg.fast_path is None else cfg.fast_path
    if cfg.fast_path is None and not runs:
        log.info("fast path: off (the Triton kernels need a CUDA device or TRITON_INTERPRET=1); "
                 "the reference PyTorch modules run")
    elif fast and not runs:
        log.warning("fast path: requested, but Triton cannot run here; the fast modules compute the "
                    "reference PyTorch math")
    llama = fast if cfg.fused_llama is None else cfg.fused_llama
    if fast or llama:
        patch(model, branches=fast, llama=llama)
        log.info("fast path: %s", patched_summary(model))
    model.fused_loss = bool(cfg.fused_loss)
    log.info("loss: %s", "answer-only chunked linear cross-entropy (no logits of other positions; "
                         "--no-fused-loss for full logits)" if cfg.fused_loss
             else "lm_head on every position, then cross-entropy (--no-fused-loss)")
    return dataclasses.replace(cfg, fast_path=fast, fused_llama=llama)


def patched_summary(model) -> str:
    """What runs fused, by the table of parts: "Triton-fused Qformer (frozen, no_grad), ..."."""
    from fastground.fast.llama import llama_patched_layers
    from fastground.fast.patching import is_patched
    from fastground.model.branches import PARTS
    inner = model.model
    names = []
    if is_patched(model):
        for p in PARTS:
            if p.fast in ("qformer", "linear", "mlp_adapter"):
                m = getattr(inner, p.name, None)
                if m is not None and type(m).__module__.startswith("fastground.fast"):
                    names.append(p.name + (" (frozen, under no_grad)" if p.role == "encoder" else ""))
    out = []
    if names:
        out.append("Triton-fused " + ", ".join(names))
        out.append("video/audio temporal PE fused into the Q-Former K/V GEMM")
    n = llama_patched_layers(model)
    if n:
        out.append(f"fused RMSNorm, RoPE and SwiGLU in {n} Llama layers")
    return "; ".join(out) or "nothing (reference modules)"


def packing(cfg, model) -> tuple[bool, int]:
    """(packed, token budget per micro-batch). Packed by default where a varlen attention
    runs: FlashAttention-2 or torch's varlen kernel on GPU (cu_seqlens from the collate), and
    SDPA on CPU, where transformers builds the block-diagonal mask from the restarting
    position ids; padded elsewhere (SDPA on GPU would get a dense (T x T) mask)."""
    backend = model.model.config._attn_implementation
    varlen = backend in VARLEN_BACKENDS or (not torch.cuda.is_available() and backend == "sdpa")
    packed = varlen if cfg.packed is None else cfg.packed
    if packed and not varlen:
        log.warning("--packed with the %s attention backend: packed rows attend through a dense mask", backend)
    budget = cfg.max_tokens or cfg.micro_batch * cfg.max_length
    if packed and budget < cfg.max_length:
        from fastground.train.cli import ConfigError
        raise ConfigError(f"--max-tokens {budget} is below --max-length {cfg.max_length}: the longest sample "
                          "would not fit a micro-batch")
    if packed:
        log.info("batches: packed, micro-batches filled up to %d tokens (--max-tokens), cu_seqlens made in "
                 "the collate (%s attention); --no-packed for padded ones", budget, backend)
    else:
        log.info("batches: padded, %d samples per micro-batch%s", cfg.micro_batch,
                 "" if varlen else f" (no varlen attention with the {backend} backend)")
    return packed, budget


# ---------------------------------------------------------------------------- checkpointing
@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per process. Activations: what backward keeps of the LLM layers for one
    micro-batch of `tokens` tokens under each checkpointing mode."""
    weights: float
    grads_and_optimizer: float
    activations: dict
    available: float | None
    tokens: int

    def total(self, mode: str) -> float:
        return self.weights + self.grads_and_optimizer + self.activations[mode]

    def describe(self) -> str:
        gib = 2.0 ** 30
        acts = ", ".join(f"{m} {v / gib:.2f}" for m, v in self.activations.items())
        avail = f" of {self.available / gib:.1f} GiB" if self.available else ""
        return (f"weights {self.weights / gib:.2f} GiB + gradients/optimizer {self.grads_and_optimizer / gib:.2f} GiB "
                f"+ activations of {self.tokens} tokens ({acts} GiB){avail}")


def activation_bytes_per_token(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                               elem: int) -> dict:
    """Bytes each token leaves for backward, per checkpointing mode, summed over the layers.

    none: per layer the two RMSNorm inputs and outputs (4h), q/k/v before and after RoPE
      (2h + 4 kv h), the attention output and its log-sum-exp (h), o_proj's output feeding the
      residual (h), gate/up outputs and the SwiGLU product (3i): ~ (8h + 4kv + 3i) elements;
    selective: the layer input and the matmul/attention outputs only (input, q, attention,
      o_proj: 4h; k, v: 2kv; gate, up: 2i), norms, RoPE and SwiGLU recomputed;
    full: each layer's input (h), the layer recomputed in backward."""
    kv = hidden * kv_heads // heads
    none = 8 * hidden + 4 * kv + 3 * intermediate
    selective = 4 * hidden + 2 * kv + 2 * intermediate
    full = hidden
    return {m: v * elem * layers for m, v in (("none", none), ("selective", selective), ("full", full))}


def device_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(cfg, model, trainable: dict, bf16: bool, world: int, device: torch.device) -> MemoryEstimate:
    mc = model.config
    elem = 2 if bf16 else 4
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable.values())
    weights = n_all * elem
    # ZeRO-2: gradients and fp32 master weights + Adam moments partitioned over the ranks; the
    # full-size gradient buckets of the backward in the compute dtype.
    grads_opt = n_train * elem + n_train * (4 + 8 + (4 if bf16 else 0)) / world
    tokens = cfg.max_tokens or cfg.micro_batch * cfg.max_length
    per_tok = activation_bytes_per_token(mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers,
                                         mc.num_attention_heads, mc.num_key_value_heads, elem)
    acts = {m: v * tokens for m, v in per_tok.items()}
    return MemoryEstimate(weights, grads_opt, acts, device_memory(device), tokens)


def choose_checkpointing(est: MemoryEstimate, headroom: float = 0.8) -> str:
    """The least recomputation whose estimate fits `headroom` of the device (the rest is
    left to the encoders' activations, the allocator and the logits-free loss)."""
    if est.available is None:
        return "none"
    for mode in ("none", "selective", "full"):
        if est.total(mode) <= headroom * est.available:
            return mode
    return "full"


def selective_policy():
    """torch's selective activation checkpointing: keep the outputs of matmuls and attention
    (the costly ops), recompute everything else (norms, RoPE, SwiGLU, adds)."""
    from torch.utils.checkpoint import CheckpointPolicy
    keep = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
                 "_flash_attention_forward"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            keep.add(op.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(selective_policy())


def enable_checkpointing(model, mode: str) -> None:
    if mode == "none":
        return
    # Non-reentrant: the reentrant variant drops the gradients of a layer whose input does
    # not require grad (stage 1, where only media positions carry trainable features).
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    if hasattr(model.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_checkpointing(cfg, model, trainable: dict, bf16: bool, world: int, device: torch.device) -> str:
    est = estimate_memory(cfg, model, trainable, bf16, world, device)
    mode = cfg.checkpointing or choose_checkpointing(est)
    log.info("memory estimate per process: %s -> checkpointing %s%s", est.describe(), mode,
             "" if cfg.checkpointing is None else " (--checkpointing)")
    enable_checkpointing(model, mode)
    return mode

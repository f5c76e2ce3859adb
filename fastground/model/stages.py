"""What trains in each of the three coarse-to-fine stages (paper 3.2, Table 9)."""
from __future__ import annotations

from torch import nn

# The adapters: everything between a frozen encoder and the LLM.
ADAPTER_PREFIXES = (
    "model.mm_vision_projector.",
    "model.video_Qformer.",
    "model.video_query_tokens",
    "model.video_frame_position_embedding.",
    "model.llama_proj.",
    "model.audio_Qformer.",
    "model.audio_query_tokens",
    "model.audio_position_embedding.",
    "model.audio_llama_proj.",
)
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
ENCODER_PREFIXES = ("model.vision_tower.", "model.visual_encoder.", "model.ln_vision.", "model.Qformer.",
                    "model.query_tokens", "model.audio_encoder.")


def _has_prefix(name: str, prefixes) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p) for p in prefixes)


def is_trainable(name: str, stage: int) -> bool:
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if _has_prefix(name, ENCODER_PREFIXES):
        return False
    if _has_prefix(name, ADAPTER_PREFIXES):
        return True
    return stage >= 2 and _has_prefix(name, LLM_PREFIXES)


def trainable_parameters(model: nn.Module, stage: int) -> dict[str, nn.Parameter]:
    """Name -> parameter of what stage `stage` trains: stage 1 the adapters (image MLP,
    video/audio Q-Formers with their query tokens and position embeddings, llama_proj,
    audio_llama_proj); stages 2 and 3 the LLM as well. Encoders are always frozen."""
    return {n: p for n, p in model.named_parameters() if is_trainable(n, stage)}


def set_stage(model: nn.Module, stage: int) -> dict[str, nn.Parameter]:
    """Set requires_grad for `stage` and return the trainable set."""
    trainable = trainable_parameters(model, stage)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    return trainable


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter count per branch, for people sizing a run."""
    groups = {
        "backbone (Vicuna)": LLM_PREFIXES,
        "CLIP ViT-L/14 (image encoder)": ("model.vision_tower.",),
        "image adapter": ("model.mm_vision_projector.",),
        "EVA ViT-g (video encoder)": ("model.visual_encoder.", "model.ln_vision."),
        "BLIP-2 Q-Former (frames)": ("model.Qformer.", "model.query_tokens"),
        "video Q-Former + PE + llama_proj": ("model.video_Qformer.", "model.video_query_tokens",
                                              "model.video_frame_position_embedding.", "model.llama_proj."),
        "ImageBind audio encoder": ("model.audio_encoder.",),
        "audio Q-Former + PE + proj": ("model.audio_Qformer.", "model.audio_query_tokens",
                                        "model.audio_position_embedding.", "model.audio_llama_proj."),
    }
    out = {k: 0 for k in groups}
    other = 0
    for n, p in model.named_parameters():
        for g, prefixes in groups.items():
            if _has_prefix(n, prefixes):
                out[g] += p.numel()
                break
        else:
            other += p.numel()
    if other:
        out["other"] = other
    out["total"] = sum(p.numel() for p in model.parameters())
    return out

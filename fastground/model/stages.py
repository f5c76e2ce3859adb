"""What trains in each of the three coarse-to-fine stages (paper 3.2, Table 9)."""
from __future__ import annotations

import torch
from torch import nn

from fastground.model.branches import PARTS, part_of, parts, prefixes

# Key prefixes by role, from the one table of parts (fastground.model.branches).
ADAPTER_PREFIXES = prefixes(*parts(role="adapter"))
LLM_PREFIXES = prefixes(*parts(role="llm"))
ENCODER_PREFIXES = prefixes(*parts(role="encoder"))


def _has_prefix(name: str, prefixes) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p) for p in prefixes)


def is_trainable(name: str, stage: int) -> bool:
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    part = part_of(name)
    return part is not None and part.trains_from is not None and stage >= part.trains_from


def trainable_parameters(model: nn.Module, stage: int) -> dict[str, nn.Parameter]:
    """Name -> parameter of what stage `stage` trains: stage 1 the adapters (image MLP,
    video/audio Q-Formers with their query tokens and position embeddings, llama_proj,
    audio_llama_proj) and, as the release, the input embeddings (of which media samples
    reach only the media start/end rows: detach_text_embeddings); stages 2 and 3 the LLM as
    well. Encoders are always frozen."""
    return {n: p for n, p in model.named_parameters() if is_trainable(n, stage)}


def set_stage(model: nn.Module, stage: int) -> dict[str, nn.Parameter]:
    """Set requires_grad for `stage` and return the trainable set; in stage 1 the model's
    forward also detaches the text embeddings of media samples (`stage1_embeddings`)."""
    trainable = trainable_parameters(model, stage)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    if hasattr(model, "stage1_embeddings"):
        model.stage1_embeddings = stage == 1
    return trainable


def detach_text_embeddings(emb: torch.Tensor, input_ids: torch.Tensor, cfg,
                           cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 as released: in a sample with media, every text embedding is detached except
    the media start/end tokens (media positions keep their branch features' gradient), so of
    the input embedding matrix only the start/end rows train on media samples; a text-only
    sample trains every row it uses. Samples are rows of a padded batch, or the cu_seqlens
    segments of a packed one.

    Not copied: the release detaches everything after a sound block, which also cuts the
    gradient of an image spliced earlier into the same sample; here every media block of
    every sample keeps its gradient.
    """
    markers = torch.zeros_like(input_ids, dtype=torch.bool)
    media = torch.zeros_like(input_ids, dtype=torch.bool)
    for modality in ("image", "video", "sound"):
        patch, start, end = cfg.token_ids(modality)
        if min(patch, start, end) < 0:
            continue
        m = (input_ids == start) | (input_ids == end)
        markers |= m
        media |= m | (input_ids == patch)
    if cu_seqlens is None:
        has_media = markers.any(dim=1, keepdim=True)
    else:  # packed (1, total): one sample per cu_seqlens segment
        bounds = cu_seqlens.to(device=input_ids.device, dtype=torch.long)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        seg = torch.searchsorted(bounds[1:], pos, right=True).clamp_(max=bounds.numel() - 2)
        per_seg = torch.zeros(bounds.numel() - 1, device=input_ids.device).index_add_(
            0, seg, markers[0].float())
        has_media = (per_seg > 0)[seg][None]
    keep = media | ~has_media
    return torch.where(keep.unsqueeze(-1), emb, emb.detach())


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter count per branch, for people sizing a run."""
    groups: dict[str, tuple[str, ...]] = {}
    for part in sorted(PARTS, key=lambda part: part.role != "llm"):  # the backbone first, then table order
        groups[part.label] = groups.get(part.label, ()) + prefixes(part)
    out = {k: 0 for k in groups}
    other = 0
    for n, p in model.named_parameters():
        for g, group in groups.items():
            if _has_prefix(n, group):
                out[g] += p.numel()
                break
        else:
            other += p.numel()
    if other:
        out["other"] = other
    out["total"] = sum(p.numel() for p in model.parameters())
    return out

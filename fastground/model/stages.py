"""What trains in each of the three coarse-to-fine stages (paper 3.2, Table 9)."""
from __future__ import annotations

from torch import nn

from fastground.model.branches import PARTS, parts, prefixes

# Key prefixes by role, from the one table of parts (fastground.model.branches).
ADAPTER_PREFIXES = prefixes(*parts(role="adapter"))
LLM_PREFIXES = prefixes(*parts(role="llm"))
ENCODER_PREFIXES = prefixes(*parts(role="encoder"))


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

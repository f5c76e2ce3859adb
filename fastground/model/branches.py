"""The one table of GroundingGPT's parts: which branch each module belongs to, whether it is
a frozen encoder, from which stage it trains, what `fastground.patch` swaps it for, and which
encoder weight file supplies it.

Everything that needs such a list (stage freezing, the frozen modules' eval mode, the encoder
weight files of `from_pretrained`, `patch`/`unpatch`, the parameter report, the FLOP count of
the training metrics) reads it from here, so adding a module is one line.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: str  # attribute of GroundingGPTModel; "lm_head" lives on GroundingGPT itself
    branch: str  # "image", "video", "audio" or "llm"
    role: str  # "encoder" (frozen, eval mode), "adapter" (encoder -> LLM) or "llm"
    trains_from: int | None  # first stage (1-3) that trains it; None: never
    fast: str | None = None  # what patch swaps in: "qformer", "linear", "mlp_adapter", "llama_layers"
    weight_file: str | None = None  # from_pretrained keyword whose file supplies it when the checkpoint lacks it
    is_parameter: bool = False  # a bare nn.Parameter (query tokens), not a module
    label: str = ""  # the group's name in the parameter report

    @property
    def key(self) -> str:
        """Prefix of its state-dict keys, without the trailing dot."""
        return self.name if self.name == "lm_head" else f"model.{self.name}"

    def owns(self, key: str) -> bool:
        return key == self.key or key.startswith(self.key + ".")


PARTS: tuple[Part, ...] = (
    # image: CLIP ViT-L/14 -> MLP adapter
    Part("vision_tower", "image", "encoder", None, weight_file="vision_tower_path",
         label="CLIP ViT-L/14 (image encoder)"),
    Part("mm_vision_projector", "image", "adapter", 1, fast="mlp_adapter", label="image adapter"),
    # video: EVA ViT-g + ln_vision + BLIP-2 frame Q-Former per frame -> temporal PE + video Q-Former + llama_proj
    Part("visual_encoder", "video", "encoder", None, weight_file="eva_path", label="EVA ViT-g (video encoder)"),
    Part("ln_vision", "video", "encoder", None, weight_file="qformer_path", label="EVA ViT-g (video encoder)"),
    Part("Qformer", "video", "encoder", None, fast="qformer", weight_file="qformer_path",
         label="BLIP-2 Q-Former (frames)"),
    Part("query_tokens", "video", "encoder", None, weight_file="qformer_path", is_parameter=True,
         label="BLIP-2 Q-Former (frames)"),
    Part("video_Qformer", "video", "adapter", 1, fast="qformer", label="video Q-Former + PE + llama_proj"),
    Part("video_query_tokens", "video", "adapter", 1, is_parameter=True, label="video Q-Former + PE + llama_proj"),
    Part("video_frame_position_embedding", "video", "adapter", 1, label="video Q-Former + PE + llama_proj"),
    Part("llama_proj", "video", "adapter", 1, fast="linear", label="video Q-Former + PE + llama_proj"),
    # audio: ImageBind audio trunk -> clip PE + audio Q-Former + projection
    Part("audio_encoder", "audio", "encoder", None, weight_file="imagebind_path", label="ImageBind audio encoder"),
    Part("audio_Qformer", "audio", "adapter", 1, fast="qformer", label="audio Q-Former + PE + proj"),
    Part("audio_query_tokens", "audio", "adapter", 1, is_parameter=True, label="audio Q-Former + PE + proj"),
    Part("audio_position_embedding", "audio", "adapter", 1, label="audio Q-Former + PE + proj"),
    Part("audio_llama_proj", "audio", "adapter", 1, fast="linear", label="audio Q-Former + PE + proj"),
    # the Vicuna backbone
    # Stage 1 trains it too, as the release: on media samples only the media start/end rows
    # (fastground.model.stages.detach_text_embeddings).
    Part("embed_tokens", "llm", "llm", 1, label="backbone (Vicuna)"),
    Part("layers", "llm", "llm", 2, fast="llama_layers", label="backbone (Vicuna)"),
    Part("norm", "llm", "llm", 2, fast="llama_layers", label="backbone (Vicuna)"),
    Part("lm_head", "llm", "llm", 2, label="backbone (Vicuna)"),
)

# The LLM parts every token's forward and backward goes through (embed_tokens is a lookup).
PER_TOKEN_LLM = ("layers", "norm", "lm_head")


def parts(role: str | None = None, branch: str | None = None, fast: str | None = None) -> tuple[Part, ...]:
    return tuple(p for p in PARTS if (role is None or p.role == role) and (branch is None or p.branch == branch)
                 and (fast is None or p.fast == fast))


def prefixes(*selected: Part) -> tuple[str, ...]:
    """State-dict key prefixes ("model.layers.", "model.query_tokens") of these parts."""
    return tuple(p.key if p.is_parameter else p.key + "." for p in selected)


def part_of(key: str) -> Part | None:
    for p in PARTS:
        if p.owns(key):
            return p
    return None


def frozen_modules() -> tuple[str, ...]:
    """Encoder modules (not bare parameters): frozen and kept in eval mode."""
    return tuple(p.name for p in parts(role="encoder") if not p.is_parameter)


def frozen_parameters() -> tuple[str, ...]:
    return tuple(p.name for p in parts(role="encoder") if p.is_parameter)


def fast_swaps(kind: str) -> tuple[str, ...]:
    """Names of the modules `patch` swaps for the fast `kind`."""
    return tuple(p.name for p in parts(fast=kind))


def weight_files() -> dict[str, tuple[str, ...]]:
    """from_pretrained keyword -> key prefixes its file supplies (the CLIP tower loads apart)."""
    out: dict[str, tuple[str, ...]] = {}
    for p in PARTS:
        if p.weight_file and p.weight_file != "vision_tower_path":
            out.setdefault(p.weight_file, ())
            out[p.weight_file] += prefixes(p)
    return out

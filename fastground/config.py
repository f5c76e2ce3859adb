"""Model configuration: one dataclass, the release's values as defaults, presets."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

# Tokens the release appends to the Vicuna tokenizer, in this order.
MEDIA_TOKENS = (
    "<im_patch>", "<im_start>", "<im_end>",
    "<vi_patch>", "<vi_start>", "<vi_end>",
    "<so_patch>", "<so_start>", "<so_end>",
)
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "sound": "<sound>"}

# Release config.json fields that hold token ids, keyed by modality.
TOKEN_ID_FIELDS = {
    "image": ("im_patch_token", "im_start_token", "im_end_token"),
    "video": ("video_patch_token", "video_start_token", "video_end_token"),
    "sound": ("sound_patch_token", "sound_start_token", "sound_end_token"),
}


@dataclass
class GroundingGPTConfig:
    # --- Vicuna-7B v1.5 backbone (Llama-2 architecture)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    tie_word_embeddings: bool = False

    # --- image branch: CLIP ViT-L/14-336, layer -2, CLS dropped, MLP adapter
    mm_vision_tower: str = "openai/clip-vit-large-patch14-336"
    clip_image_size: int = 336
    clip_patch_size: int = 14
    clip_hidden_size: int = 1024
    clip_intermediate_size: int = 4096
    clip_num_layers: int = 24
    clip_num_heads: int = 16
    clip_projection_dim: int = 768
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = True

    # --- video branch: EVA ViT-g/14 + ln_vision + BLIP-2 Q-Former per frame
    eva_image_size: int = 224
    eva_patch_size: int = 14
    eva_width: int = 1408
    eva_depth: int = 39
    eva_num_heads: int = 16
    eva_mlp_ratio: float = 4.3637
    eva_path: str | None = None  # eva_vit_g.pth, loaded like the release does
    qformer_path: str | None = None  # blip2 checkpoint with the frame Q-Former
    num_query_token: int = 32
    num_frames: int = 64
    max_frame: int = 64
    video_token_len: int = 64
    video_qformer_layers: int = 2

    # --- BERT-base Q-Former shared by the three Q-Formers
    qformer_hidden_size: int = 768
    qformer_num_layers: int = 12
    qformer_num_heads: int = 12
    qformer_intermediate_size: int = 3072
    qformer_cross_attention_freq: int = 2
    qformer_layer_norm_eps: float = 1e-12
    qformer_hidden_dropout: float = 0.1
    qformer_attention_dropout: float = 0.1
    qformer_max_position_embeddings: int = 512

    # --- audio branch: ImageBind-huge audio trunk + audio Q-Former
    imagebind_path: str | None = None  # imagebind_huge.pth
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_kernel_size: int = 16
    audio_stride: int = 10
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_drop_path: float = 0.1
    audio_out_dim: int = 1024
    audio_logit_scale: float = 20.0
    num_audio_clips: int = 3
    audio_clip_seconds: float = 2.0
    sound_token_len: int = 8
    audio_qformer_layers: int = 2
    # The release calls audio_encoder.eval() once but, unlike EVA and the frame Q-Former,
    # does not pin it there, so the trainer's model.train() re-enables ImageBind's
    # stochastic depth (0.1) on the frozen audio trunk. We keep it in eval (deterministic)
    # by default; True reproduces the release.
    release_audio_train_mode: bool = False

    # --- token ids (set from the tokenizer; -1 = not assigned yet)
    im_patch_token: int = -1
    im_start_token: int = -1
    im_end_token: int = -1
    video_patch_token: int = -1
    video_start_token: int = -1
    video_end_token: int = -1
    sound_patch_token: int = -1
    sound_start_token: int = -1
    sound_end_token: int = -1

    # --- engine settings (not part of the release)
    attn_implementation: str = "auto"  # auto | flash_attention_2 | sdpa | eager
    fast_path: bool = False  # build Triton-fused Q-Former/adapters directly
    initializer_range: float = 0.02
    preset: str = "groundinggpt-7b"
    # The conversation template the model was trained with (fastground.data.templates);
    # None, as in every release checkpoint, means the release's "lego".
    conversation_template: str | None = None

    # ------------------------------------------------------------------ derived
    @property
    def image_token_len(self) -> int:
        return (self.clip_image_size // self.clip_patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def audio_position_embeddings(self) -> int:
        """Rows of `audio_position_embedding` (one per clip index): the release sizes the
        table by sound_token_len (Embedding(sound_token_len, 1024), 8 in the release)."""
        return self.sound_token_len

    def media_token_len(self, modality: str) -> int:
        return {"image": self.image_token_len, "video": self.video_token_len,
                "sound": self.sound_token_len}[modality]

    def token_ids(self, modality: str) -> tuple[int, int, int]:
        """(patch, start, end) ids of a modality."""
        return tuple(getattr(self, f) for f in TOKEN_ID_FIELDS[modality])

    def set_token_ids(self, tokenizer) -> None:
        """Read the media token ids from a tokenizer that has MEDIA_TOKENS added."""
        ids = tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS))
        names = sum((list(TOKEN_ID_FIELDS[m]) for m in ("image", "video", "sound")), [])
        for name, tok, i in zip(names, MEDIA_TOKENS, ids):
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer lacks the media token {tok!r}")
            setattr(self, name, int(i))
        self.vocab_size = max(self.vocab_size, len(tokenizer))

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GroundingGPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(preset=name, **values)

    def replace(self, **changes: Any) -> "GroundingGPTConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ release config.json
    def to_release_dict(self) -> dict:
        """config.json as the release writes it (LEGOConfig, a LlamaConfig), plus our own
        encoder sizes under "fastground" so small presets round-trip."""
        d = {
            "architectures": ["LEGOLlamaForCausalLM"],
            "model_type": "LEGO",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "torch_dtype": "bfloat16",
            "mm_vision_tower": self.mm_vision_tower,
            "mm_vision_hidden_size": self.clip_hidden_size,
            "mm_vision_select_layer": self.mm_vision_select_layer,
            "mm_vision_select_feature": self.mm_vision_select_feature,
            "mm_use_im_start_end": self.mm_use_im_start_end,
            "use_mm_vision_proj": True,
            "image_token_len": self.image_token_len,
            "num_query_token": self.num_query_token,
            "max_frame": self.max_frame,
            "video_token_len": self.video_token_len,
            "sound_token_len": self.sound_token_len,
        }
        for names in TOKEN_ID_FIELDS.values():
            for n in names:
                d[n] = getattr(self, n)
        release_keys = set(d) | {"mm_vision_hidden_size"}
        d["fastground"] = {f.name: getattr(self, f.name) for f in fields(self)
                           if f.name not in release_keys}
        return d

    @classmethod
    def from_release_dict(cls, d: dict) -> "GroundingGPTConfig":
        if d.get("model_type") not in ("LEGO", "llama", None):
            raise ValueError(f"config model_type {d.get('model_type')!r} is not a GroundingGPT (LEGO) config")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "mm_vision_hidden_size" in d:
            values["clip_hidden_size"] = d["mm_vision_hidden_size"]
        values.update({k: v for k, v in d.get("fastground", {}).items() if k in known})
        return cls(**values)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_release_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str) -> "GroundingGPTConfig":
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_release_dict(d)


PRESETS: dict[str, dict[str, Any]] = {
    "groundinggpt-7b": {},
    "groundinggpt-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                             num_attention_heads=40, num_key_value_heads=40),
    # Same structure, sizes for CPU tests: every branch, every key, a forward+backward
    # over a mixed batch in a fraction of a second. Audio keeps the release's 128x204
    # fbank so the data pipeline is the same for every preset.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        mm_vision_tower="", clip_image_size=56, clip_patch_size=14, clip_hidden_size=32,
        clip_intermediate_size=64, clip_num_layers=2, clip_num_heads=2, clip_projection_dim=32,
        eva_image_size=56, eva_patch_size=14, eva_width=48, eva_depth=2, eva_num_heads=2,
        num_query_token=4, num_frames=4, max_frame=8, video_token_len=6,
        qformer_hidden_size=32, qformer_num_layers=2, qformer_num_heads=2,
        qformer_intermediate_size=64, qformer_max_position_embeddings=32,
        audio_embed_dim=32, audio_num_blocks=2, audio_num_heads=2, audio_out_dim=40,
        sound_token_len=4,
    ),
}

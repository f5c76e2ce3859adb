"""GroundingGPT (the release's LEGOLlamaForCausalLM), reference path.

Data flows one way: media -> branch (frozen encoder -> trainable adapter) -> LLM embeddings
-> Llama backbone -> lm_head. Module names are the release's, so `state_dict()` keys are
`model.embed_tokens...`, `model.video_Qformer.bert...`, `lm_head.weight` etc.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaModel

from fastground.config import GroundingGPTConfig
from fastground.model.backbone import announce_backend, llama_config
from fastground.model.branches import frozen_modules, frozen_parameters
from fastground.model.eva_vit import EVAVisionTransformer
from fastground.model.imagebind_audio import ImageBindAudioEncoder
from fastground.model.qformer import QFormer, QFormerSpec, init_qformer_weights
from fastground.model.stages import detach_text_embeddings

# Modules that never train (the release freezes them and keeps them in eval mode).
FROZEN_ENCODERS = frozen_modules()
FROZEN_PARAMS = frozen_parameters()


def qformer_spec(cfg: GroundingGPTConfig, num_layers: int, encoder_width: int, freq: int) -> QFormerSpec:
    return QFormerSpec(
        hidden_size=cfg.qformer_hidden_size, num_layers=num_layers, num_heads=cfg.qformer_num_heads,
        intermediate_size=cfg.qformer_intermediate_size, encoder_width=encoder_width,
        cross_attention_freq=freq, layer_norm_eps=cfg.qformer_layer_norm_eps,
        hidden_dropout=cfg.qformer_hidden_dropout, attention_dropout=cfg.qformer_attention_dropout,
        max_position_embeddings=cfg.qformer_max_position_embeddings,
    )


def clip_vision_config(cfg: GroundingGPTConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.clip_hidden_size, intermediate_size=cfg.clip_intermediate_size,
        num_hidden_layers=cfg.clip_num_layers, num_attention_heads=cfg.clip_num_heads,
        image_size=cfg.clip_image_size, patch_size=cfg.clip_patch_size,
        projection_dim=cfg.clip_projection_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def _query_tokens(n: int, width: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, n, width) * std)


class GroundingGPTModel(LlamaModel):
    """LlamaModel plus the three branches, as the release's LEGOLlamaModel."""

    def __init__(self, cfg: GroundingGPTConfig, vision_tower: nn.Module | None = None):
        super().__init__(llama_config(cfg))
        self.gg_config = cfg
        std = cfg.initializer_range
        qh = cfg.qformer_hidden_size

        # image: CLIP ViT (its own weights, outside the release state dict) + MLP adapter
        self.vision_tower = vision_tower if vision_tower is not None else CLIPVisionModel(clip_vision_config(cfg))
        self.mm_vision_projector = nn.Sequential(
            nn.Linear(cfg.clip_hidden_size, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size))

        # video: EVA ViT-g + ln_vision + BLIP-2 Q-Former per frame, then temporal PE,
        # the video Q-Former and llama_proj
        self.visual_encoder = EVAVisionTransformer.from_config(cfg)
        self.ln_vision = nn.LayerNorm(cfg.eva_width)
        self.Qformer = QFormer(qformer_spec(cfg, cfg.qformer_num_layers, cfg.eva_width, cfg.qformer_cross_attention_freq))
        self.query_tokens = _query_tokens(cfg.num_query_token, qh, std)
        self.llama_proj = nn.Linear(qh, cfg.hidden_size)
        self.video_frame_position_embedding = nn.Embedding(cfg.max_frame, qh)
        self.video_Qformer = QFormer(qformer_spec(cfg, cfg.video_qformer_layers, qh, 1))
        self.video_query_tokens = _query_tokens(cfg.video_token_len, qh, std)

        # audio: ImageBind audio trunk, clip position embedding, audio Q-Former, projection
        self.audio_encoder = ImageBindAudioEncoder.from_config(cfg)
        self.audio_Qformer = QFormer(qformer_spec(cfg, cfg.audio_qformer_layers, cfg.audio_out_dim, 1))
        self.audio_query_tokens = _query_tokens(cfg.sound_token_len, qh, std)
        self.audio_llama_proj = nn.Linear(qh, cfg.hidden_size)
        self.audio_position_embedding = nn.Embedding(cfg.audio_position_embeddings, cfg.audio_out_dim)

        for q in (self.Qformer, self.video_Qformer, self.audio_Qformer):
            init_qformer_weights(q, std)
        for enc in FROZEN_ENCODERS:
            getattr(self, enc).requires_grad_(False)
        for name in FROZEN_PARAMS:
            getattr(self, name).requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen encoders stay in eval mode (no dropout), as the release's disabled_train.
        for enc in FROZEN_ENCODERS:
            if getattr(self, enc) is not None:  # None: detached (fastground.model.detached)
                getattr(self, enc).train(False)
        if mode and self.gg_config.release_audio_train_mode and self.audio_encoder is not None:
            self.audio_encoder.train(True)
        return self

    # ------------------------------------------------------------------ branches
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen part of the image branch: (N, 3, S, S) -> CLIP select-layer patch features."""
        with torch.no_grad():
            out = self.vision_tower(images.to(self._tower_dtype()), output_hidden_states=True)
            return out.hidden_states[self.gg_config.mm_vision_select_layer][:, 1:]

    def image_branch(self, feats: torch.Tensor) -> torch.Tensor:
        """Trainable part: (N, patches, clip_hidden) -> (N, image_token_len, hidden)."""
        return self.mm_vision_projector(feats.to(self.mm_vision_projector[0].weight.dtype))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, image_token_len, hidden)."""
        return self.image_branch(self.image_features(images))

    def _tower_dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def frame_features(self, videos: torch.Tensor) -> torch.Tensor:
        """Frozen part of the video branch: (N, 3, T, H, W) -> (N, T, num_query_token, 768).
        uint8 (N, T, H, W, 3) frames as decoded (the trainer ships those) are normalised here,
        on the device, with the loader's own arithmetic."""
        if videos.dtype == torch.uint8:
            from fastground.data.video import normalize_frames
            videos = normalize_frames(videos)
        n, _, t = videos.shape[:3]
        frames = videos.transpose(1, 2).flatten(0, 1)  # (N*T, 3, H, W), the release's b c t -> (b t) c
        with torch.no_grad():
            emb = self.ln_vision(self.visual_encoder(frames.to(self.ln_vision.weight.dtype)))
            q = self.query_tokens.expand(emb.shape[0], -1, -1)
            out = self.Qformer.bert(query_embeds=q, encoder_hidden_states=emb, return_dict=True)
        return out.last_hidden_state.view(n, t, *out.last_hidden_state.shape[1:])

    def video_branch(self, frame_feats: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Trainable part: temporal PE + video Q-Former + llama_proj.
        (N, T, Q, 768) -> (N, video_token_len, hidden). frame_mask (N, T) marks real frames."""
        n, t, q, h = frame_feats.shape
        pe = self.video_frame_position_embedding.weight[:t]
        states = (frame_feats + pe[None, :, None, :]).reshape(n, t * q, h)
        key_mask = None if frame_mask is None else frame_mask.repeat_interleave(q, dim=1)
        vq = self.video_query_tokens.expand(n, -1, -1)
        out = self.video_Qformer.bert(query_embeds=vq, encoder_hidden_states=states,
                                      encoder_attention_mask=key_mask, return_dict=True)
        return self.llama_proj(out.last_hidden_state)

    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        return self.video_branch(self.frame_features(videos))

    def clip_features(self, sounds: torch.Tensor) -> torch.Tensor:
        """Frozen part of the audio branch: (N, clips, 1, mel, frames) -> (N, clips, 1024)."""
        with torch.no_grad():
            _, final = self.audio_encoder.get_audio_feature(sounds.to(self.audio_position_embedding.weight.dtype))
        return final

    def audio_branch(self, clip_feats: torch.Tensor, clip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Trainable part: clip PE + audio Q-Former + audio_llama_proj."""
        n, c, _ = clip_feats.shape
        states = clip_feats + self.audio_position_embedding.weight[:c][None]
        aq = self.audio_query_tokens.expand(n, -1, -1)
        out = self.audio_Qformer.bert(query_embeds=aq, encoder_hidden_states=states,
                                      encoder_attention_mask=clip_mask, return_dict=True)
        return self.audio_llama_proj(out.last_hidden_state)

    def encode_sounds(self, sounds: torch.Tensor) -> torch.Tensor:
        return self.audio_branch(self.clip_features(sounds))


@dataclass
class GroundingGPTOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # None when the fused training loss ran without return_logits
    n_tokens: int = 0  # answer tokens the loss averaged over


class GroundingGPT(nn.Module):
    """The full model: `model` (backbone + branches) and `lm_head`, as LEGOLlamaForCausalLM."""

    def __init__(self, config: GroundingGPTConfig, vision_tower: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.model = GroundingGPTModel(config, vision_tower)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        announce_backend(self.model.config._attn_implementation)
        if config.fast_path:
            from fastground.fast.patching import patch
            patch(self)

    # ------------------------------------------------------------------ embeddings
    def embed(self, input_ids: torch.Tensor, images=None, videos=None, sounds=None,
              media_checked: bool = False) -> torch.Tensor:
        """Token embeddings with every media block's patch tokens replaced by its branch
        output. Vectorised: one masked_scatter per modality, media in batch-then-position order.
        media_checked: the caller ran check_media_blocks on these ids (the trainer's collate
        does, on the CPU copy), which spares the device a host sync per check."""
        emb = self.model.embed_tokens(input_ids)
        m = self.model
        branches = ((m.image_branch, m.video_branch, m.audio_branch) if self.media_features
                    else (m.encode_images, m.encode_videos, m.encode_sounds))
        for modality, media, encode in zip(("image", "video", "sound"), (images, videos, sounds), branches):
            n_media = 0 if media is None else media.shape[0]
            if not media_checked:
                check_media_blocks(input_ids, self.config, modality, n_media)
            if n_media == 0:
                continue
            feats = encode(media).to(emb.dtype)
            patch_id = self.config.token_ids(modality)[0]
            mask = (input_ids == patch_id).unsqueeze(-1)
            emb = emb.masked_scatter(mask, feats.reshape(-1, feats.shape[-1]))
        return emb

    # Training loss: answer-only chunked linear cross-entropy (kernels/fused_ce.py) instead of
    # logits of every position; the trainer turns it on (--fused-loss), callers asking for
    # logits get them either way (return_logits=True).
    fused_loss: bool = False
    # Training from a feature cache (fastground.features, train --feature-cache): images,
    # videos and sounds hold the frozen encoders' outputs (CLIP select-layer features, frame
    # Q-Former outputs (T, 32, 768), ImageBind clip features) and only the trainable part of
    # each branch runs.
    media_features: bool = False
    # Stage 1 of the release: media samples train only the media start/end embedding rows
    # (set by fastground.model.stages.set_stage).
    stage1_embeddings: bool = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, images=None, videos=None, sounds=None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, media_checked: bool = False,
                answer_index: torch.Tensor | None = None, answer_targets: torch.Tensor | None = None,
                n_answer: int | None = None, return_logits: bool | None = None, **_) -> GroundingGPTOutput:
        """answer_index / answer_targets / n_answer: the flat (batch x length) positions whose
        next token is an answer token, those tokens and their count, as the trainer's collate
        makes them on the CPU (computed here from labels when not given, at one host sync)."""
        emb = self.embed(input_ids, images, videos, sounds, media_checked)
        if self.stage1_embeddings and self.training:
            emb = detach_text_embeddings(emb, input_ids, self.config, cu_seqlens)
        kwargs = {}
        if cu_seqlens is not None and self.model.config._attn_implementation in ("flash_attention_2", "fastground_varlen"):
            kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                          max_length_q=max_seqlen, max_length_k=max_seqlen)
        hidden = self.model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False, **kwargs).last_hidden_state
        fused = self.fused_loss and labels is not None
        logits = self.lm_head(hidden) if (return_logits or not fused) else None
        loss, n = None, 0
        if labels is not None:
            if answer_index is None:
                target = labels[:, 1:]
                pos = (target != -100).nonzero()
                answer_index = pos[:, 0] * labels.shape[1] + pos[:, 1]
                answer_targets = target[pos[:, 0], pos[:, 1]]
                n_answer = int(pos.shape[0])
            n = int(n_answer) if n_answer is not None else int(answer_index.numel())
            if fused:
                from fastground.kernels.fused_ce import linear_cross_entropy
                h = hidden.flatten(0, 1).index_select(0, answer_index)
                loss = linear_cross_entropy(h, self.lm_head.weight, answer_targets, self.lm_head.bias) / max(n, 1)
            elif n == 0:  # no answer token: a zero that still reaches every trainable tensor
                loss = logits.float().sum() * 0.0
            else:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return GroundingGPTOutput(loss, logits, n)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)
        return self

    def generate(self, input_ids, attention_mask=None, images=None, videos=None, sounds=None, **kwargs):
        """Batched generation (left padding, KV cache, greedy or sampling, stop strings);
        see fastground.model.generation.generate."""
        from fastground.model.generation import generate
        return generate(self, input_ids, attention_mask, images=images, videos=videos, sounds=sounds, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "GroundingGPT":
        from fastground.model.checkpoint import load_pretrained
        return load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path: str, **kwargs) -> None:
        from fastground.model.checkpoint import save_pretrained
        save_pretrained(self, path, **kwargs)


def check_media_blocks(input_ids: torch.Tensor, cfg: GroundingGPTConfig, modality: str, n_media: int) -> None:
    """Every media block must be start + N patch tokens + end, one block per media item.
    Counts are checked per sample on the whole batch at once; a mismatch names the sample."""
    patch_id, start_id, end_id = cfg.token_ids(modality)
    if patch_id < 0:
        if n_media:
            raise ValueError(f"{n_media} {modality} inputs given but the config has no {modality} token ids "
                             "(call config.set_token_ids(tokenizer))")
        return
    n_tok = cfg.media_token_len(modality)
    patches = (input_ids == patch_id).sum(1)
    starts = (input_ids == start_id).sum(1)
    ends = (input_ids == end_id).sum(1)
    bad = (patches != starts * n_tok) | (starts != ends)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"sample {i}: {modality} placeholder expansion is broken: {int(starts[i])} start, "
                         f"{int(ends[i])} end and {int(patches[i])} patch tokens (expected {n_tok} patches per block)")
    total = int(starts.sum())
    if total != n_media:
        per_sample = starts.tolist()
        raise ValueError(f"{modality}: the batch has {total} <{modality}> blocks (per sample {per_sample}) "
                         f"but {n_media} {modality} inputs")
    if total:
        # contiguity: the token after each start must open a run of exactly n_tok patches
        pos = (input_ids == start_id).nonzero()
        idx = pos[:, 1:2] + torch.arange(1, n_tok + 2, device=input_ids.device)
        if int(idx.max()) >= input_ids.shape[1]:
            raise ValueError(f"sample {int(pos[(idx.max(1).values >= input_ids.shape[1]).nonzero()[0], 0])}: "
                             f"{modality} block runs past the end of the sequence")
        run = input_ids[pos[:, :1], idx]
        ok = (run[:, :-1] == patch_id).all(1) & (run[:, -1] == end_id)
        if not ok.all():
            i = int(pos[(~ok).nonzero()[0], 0])
            raise ValueError(f"sample {i}: a {modality} block is not start + {n_tok} patch tokens + end")

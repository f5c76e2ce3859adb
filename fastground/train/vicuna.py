"""Stage 1 from scratch as the release starts it: Vicuna weights + the encoders' own weight
files + freshly initialised adapters.

The model is built on the meta device and filled by assignment, so a 7B start costs one
read of the weights and no random initialisation of the LLM (per rank: 8 ranks each
initialising 7B on the host would take minutes and twice the memory).
"""
from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

log = logging.getLogger("fastground.train")

# Trainable adapters, created fresh (as in the release: the LLM's post_init ran before they
# existed, so they keep PyTorch's default initialisation, the Q-Formers BERT's).
ADAPTERS = ("mm_vision_projector", "llama_proj", "video_frame_position_embedding", "video_Qformer",
            "audio_Qformer", "audio_llama_proj", "audio_position_embedding")
QUERY_TOKENS = ("video_query_tokens", "audio_query_tokens")


def vicuna_model_config(path: str, tokenizer, vision_tower: str | None, preset: str | None = None):
    from fastground.config import GroundingGPTConfig
    with open(os.path.join(path, "config.json")) as f:
        lc = json.load(f)
    heads = lc["num_attention_heads"]
    if preset is None:  # the encoders and adapters of the release model of this width
        preset = "groundinggpt-13b" if lc["hidden_size"] == 5120 else "groundinggpt-7b"
    cfg = GroundingGPTConfig.from_preset(
        preset, vocab_size=lc["vocab_size"], hidden_size=lc["hidden_size"],
        intermediate_size=lc["intermediate_size"], num_hidden_layers=lc["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=lc.get("num_key_value_heads") or heads,
        rms_norm_eps=lc.get("rms_norm_eps", 1e-5), max_position_embeddings=lc.get("max_position_embeddings", 4096),
        rope_theta=lc.get("rope_theta", 10000.0), bos_token_id=lc.get("bos_token_id", 1),
        eos_token_id=lc.get("eos_token_id", 2), pad_token_id=lc.get("pad_token_id") or 0,
        tie_word_embeddings=lc.get("tie_word_embeddings", False))
    if vision_tower:
        from transformers import CLIPVisionConfig
        vc = CLIPVisionConfig.from_pretrained(vision_tower)
        cfg = cfg.replace(clip_image_size=vc.image_size, clip_patch_size=vc.patch_size, clip_hidden_size=vc.hidden_size,
                          clip_intermediate_size=vc.intermediate_size, clip_num_layers=vc.num_hidden_layers,
                          clip_num_heads=vc.num_attention_heads, clip_projection_dim=vc.projection_dim)
    cfg.set_token_ids(tokenizer)
    return cfg


def _resize_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """New token rows start at the mean of the old ones (the release's embedding resize)."""
    if weight.shape[0] >= rows:
        return weight[:rows]
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], 0)


def _init_adapters(inner: nn.Module, std: float) -> None:
    from fastground.model.qformer import init_qformer_weights
    initialisable = (nn.Linear, nn.Embedding, nn.LayerNorm)
    for name in ADAPTERS:
        module = getattr(inner, name)
        module.to_empty(device="cpu")
        for m in module.modules():
            if isinstance(m, initialisable):
                m.reset_parameters()
            elif any(True for _ in m.parameters(recurse=False)):
                raise TypeError(f"{name}: no initialisation known for {type(m).__name__}")
        if name.endswith("Qformer"):
            init_qformer_weights(module, std)
        for bname, buf in module.named_buffers():
            if bname.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
            else:
                raise TypeError(f"{name}: no initialisation known for the buffer {bname}")
    for name in QUERY_TOKENS:
        p = getattr(inner, name)
        setattr(inner, name, nn.Parameter(torch.randn(p.shape) * std))


def build_from_vicuna(cfg, tokenizer, dtype: torch.dtype | None):
    from transformers import CLIPVisionModel

    from fastground import GroundingGPT
    from fastground.model.checkpoint import _load_encoder_files, _materialize_leftovers, read_state_dict
    from fastground.model.groundinggpt import FROZEN_ENCODERS
    from fastground.model.stages import LLM_PREFIXES

    mcfg = vicuna_model_config(cfg.model, tokenizer, cfg.vision_tower, cfg.preset)
    tower = CLIPVisionModel.from_pretrained(cfg.vision_tower)
    with torch.device("meta"):
        model = GroundingGPT(mcfg, vision_tower=tower)
    sd = {k: v for k, v in read_state_dict(cfg.model).items() if not k.endswith("rotary_emb.inv_freq")}
    own = model.state_dict()
    n_vicuna = sd["model.embed_tokens.weight"].shape[0]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in sd:
            sd[key] = _resize_rows(sd[key], mcfg.vocab_size)
    if mcfg.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    unexpected = [k for k in sd if k not in own]
    llm_keys = [k for k in own if k.startswith(LLM_PREFIXES)]
    lacking = [k for k in llm_keys if k not in sd]
    if unexpected or lacking:
        raise ValueError(f"{cfg.model}: not a Llama checkpoint this model can take: {len(lacking)} missing LLM keys "
                         f"{lacking[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}")
    model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in own if k not in sd]
    _load_encoder_files(model, missing, dict(eva_path=cfg.eva, qformer_path=cfg.qformer,
                                             imagebind_path=cfg.imagebind))
    _init_adapters(model.model, mcfg.initializer_range)
    _materialize_leftovers(model, cfg.model)
    for enc in FROZEN_ENCODERS:
        getattr(model.model, enc).requires_grad_(False)
    model.model.query_tokens.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    log.info("built from Vicuna %s: vocabulary %d -> %d (media tokens at the mean embedding), fresh adapters",
             cfg.model, n_vicuna, mcfg.vocab_size)
    return model

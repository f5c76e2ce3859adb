"""transformers integration: `model_type: "LEGO"` as a native transformers model.

    import fastground.hf  # registers LEGOConfig and LEGOLlamaForCausalLM with the Auto classes
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="auto",
                                                 low_cpu_mem_usage=True)
    out = model.generate(input_ids, attention_mask=mask, images=pixels, max_new_tokens=32)

No remote code: the classes live here and register themselves on import. A release
checkpoint or one fastground wrote loads as is (same config.json, same state-dict keys); the
CLIP tower, which is not in the release state dict, is read from the directory the config
names (`vision_tower/` for fastground checkpoints), or from `vision_tower_path=` when the
config names a hub id. Frozen-encoder weight files (`eva_path=`, `qformer_path=`,
`imagebind_path=`) fill encoders a checkpoint leaves out, as fastground's own loader does.

The model is the same modules as fastground.GroundingGPT (`self.model` is a
GroundingGPTModel), so patch(), the fast path and every test of the reference apply.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from fastground.config import GroundingGPTConfig

log = logging.getLogger("fastground")

__all__ = ["LEGOConfig", "LEGOLlamaForCausalLM"]


class LEGOConfig(LlamaConfig):
    """The release's config.json (a LlamaConfig with the media fields), read as is."""

    model_type = "LEGO"

    def to_fastground(self) -> GroundingGPTConfig:
        d = self.to_dict()
        if "rope_theta" not in d:
            rope = d.get("rope_parameters") or {}
            if "rope_theta" in rope:
                d["rope_theta"] = rope["rope_theta"]
        d["model_type"] = "LEGO"
        return GroundingGPTConfig.from_release_dict(d)


class LEGOLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LEGOConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _keys_to_ignore_on_load_missing = [r"model\.vision_tower\..*"]
    _keys_to_ignore_on_load_unexpected = [
        r"model\.audio_encoder\.modality_\w+\.(vision|text|depth|thermal|imu)\..*",
        r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    ]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LEGOConfig):
        super().__init__(config)
        from fastground.model.groundinggpt import GroundingGPTModel

        self.gg_config = config.to_fastground()
        self.model = GroundingGPTModel(self.gg_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        # Fresh models start as fastground's do; loaded ones are overwritten by the checkpoint.
        std = self.gg_config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def embed(self, input_ids, images=None, videos=None, sounds=None):
        """fastground's media splice on this model's modules (one implementation for both)."""
        from fastground.model.groundinggpt import GroundingGPT

        return GroundingGPT.embed(_Splice(self.model, self.gg_config), input_ids, images, videos, sounds)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, images=None, videos=None, sounds=None, logits_to_keep=0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            dtype = self.lm_head.weight.dtype
            media = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
                     for k, v in (("images", images), ("videos", videos), ("sounds", sounds))}
            inputs_embeds = self.embed(input_ids, **media)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def prepare_inputs_for_generation(self, input_ids, *args, images=None, videos=None, sounds=None,
                                      is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration,
                                                       **kwargs)
        # Media go through their branches once, with the prompt; decode steps carry no media tokens.
        if is_first_iteration:
            inputs.update(images=images, videos=videos, sounds=sounds)
        return inputs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, vision_tower_path: str | None = None,
                        eva_path: str | None = None, qformer_path: str | None = None,
                        imagebind_path: str | None = None, **kwargs):
        path = str(pretrained_model_name_or_path)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        _load_tower(model, path, vision_tower_path)
        gcfg = model.gg_config
        files = dict(eva_path=eva_path or gcfg.eva_path, qformer_path=qformer_path or gcfg.qformer_path,
                     imagebind_path=imagebind_path or gcfg.imagebind_path)
        missing = sorted(k for k in set(info.get("missing_keys", [])) if not k.startswith("model.vision_tower."))
        from fastground.model.checkpoint import ENCODER_FILES
        covered = tuple(p for name, prefixes in ENCODER_FILES.items() if files[name] for p in prefixes)
        uncovered = [k for k in missing if not k.startswith(covered)]
        if uncovered:
            # transformers would start them from random weights with a warning; a model that
            # silently answers from random encoders is worse than an error.
            raise ValueError(f"{path}: {len(uncovered)} weights missing from the checkpoint, e.g. {uncovered[:4]}; "
                             "frozen encoders need their own files (eva_path=, qformer_path=, imagebind_path=)")
        if any(files.values()):
            from fastground.model.checkpoint import _load_encoder_files
            _load_encoder_files(model, missing, files)
        from fastground.model.groundinggpt import FROZEN_ENCODERS
        for enc in FROZEN_ENCODERS:
            getattr(model.model, enc).requires_grad_(False)
        model.model.query_tokens.requires_grad_(False)
        model.eval()
        return (model, info) if want_info else model


class _Splice:
    """What GroundingGPT.embed reads of its model: the modules, the fastground config, and
    GroundingGPT's own settings at their defaults (class attributes, methods bound here)."""

    def __init__(self, model, config):
        self.model, self.config = model, config

    def __getattr__(self, name):
        from fastground.model.groundinggpt import GroundingGPT

        attr = getattr(GroundingGPT, name)
        return attr.__get__(self) if callable(attr) and hasattr(attr, "__get__") else attr


def _load_tower(model, path: str, vision_tower_path: str | None) -> None:
    """CLIP tower weights from the directory the config names (relative to the checkpoint)."""
    from transformers import CLIPVisionModel

    name = vision_tower_path or model.gg_config.mm_vision_tower
    if not name:
        log.warning("%s: no vision tower named; the CLIP tower keeps random weights", path)
        return
    local = name if os.path.isabs(name) else os.path.join(path, name)
    candidate = local if os.path.isdir(local) else name
    if not os.path.isdir(candidate):
        raise FileNotFoundError(
            f"{path}: the config names the vision tower {name!r}, which is not a local directory; pass "
            "vision_tower_path= pointing at a transformers CLIP directory (weights are never downloaded)")
    tower = CLIPVisionModel.from_pretrained(candidate)
    own = model.model.vision_tower
    sd = tower.state_dict()
    with torch.no_grad():
        for k, p in list(own.named_parameters()) + list(own.named_buffers()):
            if k in sd:
                p.copy_(sd[k].to(dtype=p.dtype if p.is_floating_point() else sd[k].dtype, device=p.device))


AutoConfig.register("LEGO", LEGOConfig, exist_ok=True)
AutoModelForCausalLM.register(LEGOConfig, LEGOLlamaForCausalLM, exist_ok=True)

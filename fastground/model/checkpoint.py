"""Checkpoints in the release layout.

A checkpoint is a directory with `config.json` (`model_type: "LEGO"`) and sharded
`.safetensors` or `.bin` weights under the release's key names. The CLIP vision tower is not
part of the release state dict (the release keeps it in a Python list): it loads from
`config.mm_vision_tower`, a transformers CLIP directory; fastground writes it to
`vision_tower/` inside the checkpoint and points the config there.

Keys the loader tolerates (and reports) instead of failing:
- unexpected: ImageBind's non-audio modalities under `model.audio_encoder.` (the release
  stores the whole ImageBind model; only the audio modality is used) and the
  `rotary_emb.inv_freq` buffers older transformers versions saved;
- missing: the frozen encoders (`model.visual_encoder.`, `model.ln_vision.`, `model.Qformer.`,
  `model.query_tokens`, `model.audio_encoder.`) when their own weight files are given, as
  the release loads them (eva_vit_g.pth, the BLIP-2 checkpoint, imagebind_huge.pth).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import torch
from torch import nn

from fastground.config import GroundingGPTConfig
from fastground.model.branches import weight_files

log = logging.getLogger("fastground")

VISION_TOWER_DIR = "vision_tower"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
IGNORED_UNEXPECTED = (
    re.compile(r"model\.audio_encoder\.modality_\w+\.(vision|text|depth|thermal|imu)\..*"),
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)
ENCODER_FILES = weight_files()  # keyword -> key prefixes, from the table of parts


def release_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the release names it (no vision tower)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}


# ---------------------------------------------------------------------------- saving
def save_pretrained(model, path: str, max_shard_size: str | int = "5GB", safe_serialization: bool = True,
                    save_vision_tower: bool = True) -> None:
    """Write the release layout atomically: everything goes to a temporary sibling
    directory that is renamed into place, so a crash never leaves a half checkpoint."""
    from huggingface_hub import split_torch_state_dict_into_shards

    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        cfg = model.config
        detached = getattr(model, "detached_encoders", None)  # fastground.model.detached
        if save_vision_tower:
            if detached is not None:
                shutil.copytree(detached.tower_dir, os.path.join(tmp, VISION_TOWER_DIR))
            else:
                model.model.vision_tower.save_pretrained(os.path.join(tmp, VISION_TOWER_DIR))
            cfg = cfg.replace(mm_vision_tower=VISION_TOWER_DIR)
        cfg.save(tmp)
        # Expanded views (position_ids) and non-contiguous slices cannot be serialised as is.
        sd = {k: v.detach().contiguous().cpu() for k, v in release_state_dict(model).items()}
        if detached is not None:
            sd.update(detached.state_dict())
            # the attached model's key order, so the shards are those it would have written
            first = [k for k in detached.order if k in sd]
            sd = {k: sd[k] for k in first + sorted(set(sd) - set(first))}
        pattern = "model{suffix}.safetensors" if safe_serialization else "pytorch_model{suffix}.bin"
        split = split_torch_state_dict_into_shards(sd, filename_pattern=pattern, max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            shard = {k: sd[k].clone() for k in keys}
            if safe_serialization:
                from safetensors.torch import save_file
                save_file(shard, os.path.join(tmp, filename), metadata={"format": "pt"})
            else:
                torch.save(shard, os.path.join(tmp, filename))
        if split.is_sharded:
            index = {"metadata": {**split.metadata, "total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": split.tensor_to_filename}
            with open(os.path.join(tmp, SAFE_INDEX if safe_serialization else BIN_INDEX), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: str, dst: str) -> None:
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ---------------------------------------------------------------------------- loading
def weight_files(path: str) -> list[str]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{index}: not a valid shard index ({e})") from None
            return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: shard listed in the index is missing")
        try:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file
                part = load_file(f)
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or truncated shard
            raise ValueError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from None
        sd.update(part)
    return sd


def _vision_tower(cfg: GroundingGPTConfig, path: str, vision_tower_path: str | None):
    from transformers import CLIPVisionModel

    from fastground.model.groundinggpt import clip_vision_config

    candidate = vision_tower_path or cfg.mm_vision_tower
    if candidate and not os.path.isabs(candidate) and os.path.isdir(os.path.join(path, candidate)):
        candidate = os.path.join(path, candidate)
    if candidate and os.path.isdir(candidate):
        return CLIPVisionModel.from_pretrained(candidate)
    if candidate:
        raise FileNotFoundError(
            f"{path}: vision tower {candidate!r} is not a local directory; pass vision_tower_path= "
            "pointing at a transformers CLIP directory (weights are never downloaded at run time)")
    log.warning("%s: no vision tower weights named; the CLIP tower starts from random weights", path)
    return CLIPVisionModel(clip_vision_config(cfg))


def load_pretrained(cls, path: str, vision_tower_path: str | None = None, eva_path: str | None = None,
                    qformer_path: str | None = None, imagebind_path: str | None = None,
                    dtype: torch.dtype | None = None, config: GroundingGPTConfig | None = None,
                    strict: bool = True):
    """Load a release-layout checkpoint. Built on the meta device and filled by assignment,
    so a 7B model loads without a random initialisation first."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    cfg = config or GroundingGPTConfig.load(path)
    tower = _vision_tower(cfg, path, vision_tower_path)
    with torch.device("meta"):
        model = cls(cfg, vision_tower=tower)
    sd = read_state_dict(path)
    expected = set(release_state_dict(model))
    unexpected = [k for k in sd if k not in expected]
    ignored = [k for k in unexpected if any(p.fullmatch(k) for p in IGNORED_UNEXPECTED)]
    unexpected = [k for k in unexpected if k not in ignored]
    for k in ignored:
        sd.pop(k)
    missing = sorted(expected - set(sd))
    files = dict(eva_path=eva_path or cfg.eva_path, qformer_path=qformer_path or cfg.qformer_path,
                 imagebind_path=imagebind_path or cfg.imagebind_path)
    covered = tuple(p for name, prefixes in ENCODER_FILES.items() if files[name] for p in prefixes)
    uncovered = [k for k in missing if not k.startswith(covered)]
    if strict and (unexpected or uncovered):
        raise ValueError(f"{path}: checkpoint does not match the model: "
                         f"{len(uncovered)} missing keys {_by_module(uncovered)} e.g. {uncovered[:4]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:8]}")
    model.load_state_dict(sd, strict=False, assign=True)
    if ignored:
        log.info("%s: ignored %d keys of unused modules (e.g. %s)", path, len(ignored), ignored[0])
    _load_encoder_files(model, missing, files)
    _materialize_leftovers(model, path)
    from fastground.model.groundinggpt import FROZEN_ENCODERS, FROZEN_PARAMS
    for enc in FROZEN_ENCODERS + FROZEN_PARAMS:
        getattr(model.model, enc).requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    return model.eval()  # as transformers' from_pretrained: inference unless train() is called


def _by_module(keys: list[str]) -> dict[str, int]:
    """Counts per top module, so a message about 600 keys stays readable."""
    out: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        mod = ".".join(parts[:2]) if parts[0] == "model" else parts[0]
        out[mod] = out.get(mod, 0) + 1
    return out


def _load_encoder_files(model, missing: list[str], files: dict) -> None:
    inner = model.model
    if files["eva_path"] and any(k.startswith("model.visual_encoder.") for k in missing):
        from fastground.model.eva_vit import load_eva_weights
        inner.visual_encoder.to_empty(device="cpu")
        load_eva_weights(inner.visual_encoder, files["eva_path"])
    if files["imagebind_path"] and any(k.startswith("model.audio_encoder.") for k in missing):
        from fastground.model.imagebind_audio import load_imagebind_audio_weights
        inner.audio_encoder.to_empty(device="cpu")
        load_imagebind_audio_weights(inner.audio_encoder, files["imagebind_path"])
    if files["qformer_path"] and any(k.startswith(("model.Qformer.", "model.query_tokens", "model.ln_vision."))
                                     for k in missing):
        path = files["qformer_path"]
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot read the BLIP-2 Q-Former checkpoint ({e})") from None
        blob = blob.get("model", blob)
        own = inner.state_dict()
        # The release matches BLIP-2 keys against its own by name and takes what fits.
        take = {k: v for k, v in blob.items() if k in own and k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
        need = [k for k in own if k.startswith(("Qformer.", "query_tokens", "ln_vision."))]
        lacking = [k for k in need if k not in take]
        if lacking:
            raise ValueError(f"{path}: BLIP-2 checkpoint lacks {len(lacking)} Q-Former keys, e.g. {lacking[:4]}")
        inner.load_state_dict(take, strict=False, assign=True)


def _materialize_leftovers(model, path: str) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are rebuilt; any parameter still
    on the meta device means the checkpoint did not provide it."""
    inner = model.model
    rot = inner.rotary_emb
    with torch.device("cpu"):
        inner.rotary_emb = type(rot)(config=inner.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path}: no weights for {len(left)} tensors, e.g. {left[:6]}")

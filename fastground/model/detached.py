"""Frozen encoders held on disk instead of in the model.

A run that reads the frozen encoders' outputs from a feature cache never runs CLIP, EVA,
the frame Q-Former or ImageBind, yet its checkpoints must stay whole (release layout,
loadable as-is). `detach_frozen` takes those parts out of the module tree, so DeepSpeed
never moves them to the device and no process holds them while training, after rank 0 has
written them once to a folder of the run (release key names, training dtype, the CLIP tower
as a transformers directory). `save_pretrained` puts them back into every checkpoint from
there, byte for byte what the model held.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from fastground.model.branches import parts

FOLDER = "frozen-encoders"
WEIGHTS = "encoders.safetensors"
TOWER = "vision_tower"
MANIFEST = "manifest.json"


def frozen_names() -> list[str]:
    """The model.model attributes of the frozen encoders, from the one table of parts."""
    return [p.name for p in parts(role="encoder")]


@dataclass(frozen=True)
class DetachedEncoders:
    """Where a detached model's frozen encoders live, and which weights they are."""
    directory: str
    fingerprint: str
    numel: int  # parameters taken out
    order: tuple[str, ...]  # the attached model's release state-dict keys, in order

    @property
    def tower_dir(self) -> str:
        return os.path.join(self.directory, TOWER)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen encoders' release-layout tensors (without the CLIP tower)."""
        from safetensors.torch import load_file
        path = os.path.join(self.directory, WEIGHTS)
        try:
            return load_file(path)
        except Exception as e:  # deleted or truncated while the run went on
            raise ValueError(f"{path}: cannot read the frozen encoders this run's checkpoints copy "
                             f"({type(e).__name__}: {e}); rerun without --resume to rewrite it") from None


def _manifest(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write(model, directory: str, fingerprint: str) -> None:
    """Rank 0: the frozen parts to `directory`, renamed into place when complete."""
    from safetensors.torch import save_file
    from fastground.model.checkpoint import _replace_dir
    inner = model.model
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        sd = {}
        for name in frozen_names():
            if name == TOWER:
                inner.vision_tower.save_pretrained(os.path.join(tmp, TOWER))
                continue
            part = getattr(inner, name)
            tensors = part.state_dict().items() if isinstance(part, torch.nn.Module) else [("", part)]
            for k, t in tensors:
                key = f"model.{name}.{k}" if k else f"model.{name}"
                sd[key] = t.detach().contiguous().cpu().clone()
        save_file(sd, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"fingerprint": fingerprint, "keys": len(sd)}, f)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def detach_frozen(model, directory: str, fingerprint: str, write: bool, barrier=None) -> DetachedEncoders:
    """Take the frozen encoders out of `model` (their attributes become None) after `write`
    (rank 0) has stored them in `directory`, unless it already holds these weights
    (`fingerprint`, as on a resume). Returns what save_pretrained needs to put them back."""
    from fastground.model.checkpoint import release_state_dict
    inner = model.model
    order = tuple(release_state_dict(model))
    numel = 0
    for name in frozen_names():
        part = getattr(inner, name)
        numel += sum(p.numel() for p in part.parameters()) if isinstance(part, torch.nn.Module) else part.numel()
    if write and (_manifest(directory) or {}).get("fingerprint") != fingerprint:
        _write(model, directory, fingerprint)
    if barrier is not None:
        barrier()
    for name in frozen_names():
        setattr(inner, name, None)
    model.detached_encoders = DetachedEncoders(directory, fingerprint, numel, order)
    return model.detached_encoders

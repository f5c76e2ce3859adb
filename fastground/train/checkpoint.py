"""Resumable checkpoints and the final export.

A checkpoint `<output>/checkpoint-NNNNNNN/` holds:
  ds/                   DeepSpeed's engine checkpoint: trainable weights, the ZeRO-partitioned
                        optimizer state (fp32 master weights, Adam moments) of every rank and
                        the LR scheduler. Frozen parameters are left out: a resumed run rebuilds
                        them from the same starting weights.
  trainer_state.json    step, data position (StageMixSampler state), counters, settings
  rng/rank{R}.pt        python, numpy, torch (and CUDA) RNG states of each rank
It is written under a temporary name and renamed when every rank has finished, so a crash
never leaves a directory that looks complete. The output directory is assumed to be shared
by all nodes (as DeepSpeed's own checkpointing assumes by default).

The final model goes to `<output>/final/` in the release layout (GroundingGPT.save_pretrained,
loadable with GroundingGPT.from_pretrained) with the tokenizer and the training settings,
also written to a temporary directory first.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("fastground.train")

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
DS_TAG = "ds"
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def list_checkpoints(output: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run directory, oldest first."""
    if not os.path.isdir(output):
        return []
    found = []
    for name in os.listdir(output):
        m = CKPT_RE.match(name)
        path = os.path.join(output, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_resume_checkpoint(spec: str, output: str) -> str | None:
    if spec != "latest":
        if not os.path.isfile(os.path.join(spec, STATE_FILE)):
            raise ValueError(f"--resume {spec}: not a complete checkpoint (no {STATE_FILE})")
        return spec
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(engine, output: str, step: int, trainer_state: dict, keep_last: int,
                    rank: int, device: torch.device) -> str:
    """Collective: every rank calls it."""
    final = os.path.join(output, checkpoint_name(step))
    tmp = os.path.join(output, "." + checkpoint_name(step) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    _barrier()
    engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(device), os.path.join(tmp, "rng", f"rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=2, sort_keys=True)
    _barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: str) -> dict:
    """Restores weights, optimizer and scheduler into the engine; returns the trainer state.
    RNG states are restored by the caller right before the first step (see restore_rng)."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    load_path, _ = engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"{path}: DeepSpeed found no checkpoint under {DS_TAG}/")
    return state


def restore_rng(path: str, rank: int, device: torch.device) -> None:
    rng_file = os.path.join(path, "rng", f"rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise ValueError(f"{path}: no RNG state for rank {rank} (saved with another world size?)")
    # Our own file: python's and numpy's RNG states are tuples/arrays that weights_only refuses.
    set_rng_state(torch.load(rng_file, weights_only=False), device)


def merge_lora(model: torch.nn.Module) -> int:
    """Fold LoRA adapters into their base weights and put the plain layers back, so the
    export has the release's keys. Returns the number of merged layers."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    return merged


def export_final(model, tokenizer, output: str, settings: dict) -> str:
    """Rank 0 only. Release layout + tokenizer + settings, renamed into place at the end."""
    from fastground.model.checkpoint import _replace_dir

    final = os.path.join(output, "final")
    staging = os.path.join(output, ".final.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if merge_lora(model):
        log.info("merged the LoRA adapters into the LLM weights for the export")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, "training_args.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    _replace_dir(staging, final)
    return final

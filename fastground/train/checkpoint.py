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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the partial directory is removed) or read."""


def checkpoint_problem(path: str) -> str | None:
    """What makes a checkpoint directory unusable, or None: its state file must parse, and
    every torch file of DeepSpeed's and of the RNG states must be a complete zip archive
    (torch.save's format; a truncated or overwritten file fails here, before any model is
    built)."""
    import zipfile

    state_file = os.path.join(path, STATE_FILE)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        int(state["step"])
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE} is damaged ({type(e).__name__}: {e})"
    ds = os.path.join(path, DS_TAG)
    files = []
    for sub in (ds, os.path.join(path, "rng")):
        if not os.path.isdir(sub):
            return f"no {os.path.basename(sub)}/ directory"
        for root, _, names in os.walk(sub):
            files += [os.path.join(root, n) for n in names if n.endswith(".pt")]
    if not any(f.startswith(ds + os.sep) for f in files):
        return f"no weights under {DS_TAG}/"
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                # The CRC pass reads the file; affordable below 1 GiB, and the central
                # directory check above catches truncation of bigger ones.
                if os.path.getsize(f) < 2**30 and z.testzip() is not None:
                    return f"{os.path.relpath(f, path)} fails its checksum"
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            return f"{os.path.relpath(f, path)} is damaged ({e})"
    return None


def find_resume_checkpoint(spec: str, output: str) -> str | None:
    """The checkpoint `--resume spec` continues from. "latest": the newest intact one in
    `output`; a damaged newer one is skipped with a warning naming what is wrong."""
    if spec != "latest":
        if not os.path.isfile(os.path.join(spec, STATE_FILE)):
            raise ValueError(f"--resume {spec}: not a complete checkpoint (no {STATE_FILE})")
        problem = checkpoint_problem(spec)
        if problem:
            raise ValueError(f"--resume {spec}: the checkpoint is damaged: {problem}")
        return spec
    for _, path in reversed(list_checkpoints(output)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("%s is damaged (%s); falling back to the previous checkpoint", path, problem)
    return None


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


def _failure_cause(e: BaseException, output: str) -> str:
    """Why a write failed, in words: a full disk says so (torch's C++ writer reports it as
    "basic_ios::clear: iostream error", with no errno)."""
    import errno

    free = None
    try:
        free = shutil.disk_usage(output).free
    except OSError:
        pass
    seen, x = [], e
    while x is not None and len(seen) < 8:
        seen.append(x)
        x = x.__cause__ or x.__context__
    full = any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in seen) or \
        any("No space left" in str(x) for x in seen) or (free is not None and free < 64 * 2**20)
    what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
    if full:
        where = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return f"the disk is full{where}: {what}"
    return what


def save_checkpoint(engine, output: str, step: int, trainer_state: dict, keep_last: int,
                    rank: int, device: torch.device) -> str:
    """Collective: every rank calls it. A failed write removes the partial directory and
    raises CheckpointError naming the cause; the previous checkpoints stay as they were."""
    from fastground.train import output_dir

    final = os.path.join(output, checkpoint_name(step))
    tmp = os.path.join(output, "." + checkpoint_name(step) + ".tmp")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        _barrier()
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(device), os.path.join(tmp, "rng", f"rank{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(trainer_state, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
    except Exception as e:
        cause = _failure_cause(e, output)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {final} failed, partial files removed; "
                              f"the previous checkpoints are intact. Cause: {cause}") from e
    _barrier()
    if rank == 0:
        stale = None
        if os.path.exists(final):  # same step of an earlier run: set aside, removed once replaced
            stale = final + ".replaced"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        if stale:
            shutil.rmtree(stale, ignore_errors=True)
        # The earlier run's checkpoints go only now that this run has one of its own.
        output_dir.drop_earlier_run(output, keep={os.path.abspath(final)})
        for _, old in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: str) -> dict:
    """Restores weights, optimizer and scheduler into the engine; returns the trainer state.
    RNG states are restored by the caller right before the first step (see restore_rng)."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    try:
        load_path, _ = engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as e:  # a file damaged in a way the structural check cannot see
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {first}); continue from an earlier "
                              "checkpoint with --resume DIR") from e
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

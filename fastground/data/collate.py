"""Batches as the model consumes them: padded (B, L) or packed (1, total) with cu_seqlens.

Media of a batch are stacked in sample order, one tensor per modality (None when no sample
has that modality); the model assigns them to the placeholder blocks of input_ids in order of
appearance, so the order here is the contract.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastground.data.packing import IGNORE_INDEX, pack

_MEDIA = (("image", "images"), ("video", "videos"), ("sound", "sounds"))


def stack_media(samples: Sequence[dict]) -> dict:
    out = {}
    for key, batch_key in _MEDIA:
        items = [(s.get("id"), s[key]) for s in samples if s.get(key) is not None]
        if not items:
            out[batch_key] = None
            continue
        shapes = {tuple(t.shape) for _, t in items}
        if len(shapes) != 1:
            detail = ", ".join(f"{sid!r}: {tuple(t.shape)}" for sid, t in items)
            raise ValueError(f"cannot batch {batch_key} of different shapes ({detail})")
        out[batch_key] = torch.stack([t for _, t in items])
    return out


def collate_padded(samples: Sequence[dict], pad_token_id: int) -> dict:
    """Right-padded batch: input_ids/labels/attention_mask (B, L) long, labels -100 on padding."""
    if not samples:
        raise ValueError("collate_padded: empty batch")
    lengths = [int(s["input_ids"].numel()) for s in samples]
    B, L = len(samples), max(lengths)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[b, :n] = s["input_ids"]
        labels[b, :n] = s["labels"]
        # From the lengths, not input_ids != pad: the release pads with unk, which can also
        # be a real token of the text.
        attention_mask[b, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    batch.update(stack_media(samples))
    return batch


def collate_packed(samples: Sequence[dict], max_tokens: int | None = None) -> dict:
    """All samples in one row for varlen attention: input_ids/labels/position_ids (1, total),
    cu_seqlens int32 (n+1,), max_seqlen int. The first label of every sample is -100."""
    if not samples:
        raise ValueError("collate_packed: empty batch")
    ids = [s["input_ids"] for s in samples]
    total = sum(int(t.numel()) for t in ids)
    if max_tokens is not None and total > max_tokens:
        raise ValueError(f"collate_packed: {len(samples)} samples hold {total} tokens, more than "
                         f"max_tokens={max_tokens}; group them with pack_samples first")
    input_ids, labels, position_ids, cu_seqlens = pack(ids, [s["labels"] for s in samples])
    batch = {
        "input_ids": input_ids.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(int(t.numel()) for t in ids),
    }
    batch.update(stack_media(samples))
    return batch


def pack_samples(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy first-fit, in the given order: each sample goes to the first group with room,
    else opens a new one. Returns groups of indices, each summing to <= max_tokens."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    groups: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        n = int(n)
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens={max_tokens}")
        for g, r in enumerate(room):
            if n <= r:
                groups[g].append(i)
                room[g] -= n
                break
        else:
            groups.append([i])
            room.append(max_tokens - n)
    return groups

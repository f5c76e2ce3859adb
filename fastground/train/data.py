"""The training stream: datasets of this stage (+ replay of the previous one), one step's
micro-batches at a time, resumable from the step count alone.

Reproducibility: what a step sees is a function of (seed, step) only. The sample order comes
from StageMixSampler(seed, epoch); the random video crop of a sample is seeded by
(seed, epoch, index) instead of fresh entropy; the DataLoader gets its own generator so
creating it does not move the global RNG (which dropout uses). So a run resumed at step k,
with any number of DataLoader workers, sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

IGNORE_INDEX = -100


def crop_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s random video crop in `epoch` (the one convention; the
    feature cache draws its views with it too)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededVideoLoader:
    """The dataset's video loader, fed a per-sample seed. A class, not a closure, so it
    pickles into DataLoader workers."""

    item_seed = staticmethod(crop_seed)

    def __init__(self):
        self.seed: int | None = None

    def __call__(self, path, cfg, train=False, seed=None, backend="pyav", sample_id=None, **kwargs):
        from fastground.data.video import load_video
        # uint8 frames: a quarter of the bytes through workers, pinning and the copy; the
        # model normalises them on the device (bit-identical, tests/test_feature_cache.py)
        kwargs.setdefault("normalize", False)
        return load_video(path, cfg, train=train, seed=self.seed if seed is None else seed,
                          backend=backend, sample_id=sample_id, **kwargs)


class StepSamples(torch.utils.data.Dataset):
    """Reads `(epoch, index)` items of a MixedDataset, seeding the video crop from them and
    reporting how many bad samples the dataset skipped to get this one."""

    def __init__(self, mixed, parts, video_loader: SeededVideoLoader, seed: int):
        self.mixed = mixed
        self.parts = parts  # the GroundingDatasets, whose bad_samples logs count skips
        self.video_loader = video_loader
        self.seed = seed

    def __len__(self) -> int:
        return len(self.mixed)

    def __getitem__(self, item) -> dict:
        epoch, index = item
        self.video_loader.seed = self.video_loader.item_seed(self.seed, epoch, index)
        before = sum(p.bad_samples.count for p in self.parts)
        sample = self.mixed[index]
        sample = dict(sample)
        sample["_skipped"] = sum(p.bad_samples.count for p in self.parts) - before
        return sample


def collate(samples: list[dict], pad_token_id: int, packed: bool, max_tokens: int, model_cfg=None) -> dict:
    """One micro-batch (padded, or packed into one row) with what the trainer needs to run it
    without a host sync: see `finish_batch`."""
    from fastground.data.collate import collate_packed, collate_padded
    skipped = sum(s.pop("_skipped", 0) for s in samples)
    batch = collate_packed(samples, max_tokens) if packed else collate_padded(samples, pad_token_id)
    batch["_skipped"] = skipped
    batch["_samples"] = len(samples)
    return finish_batch(batch, model_cfg)


def collate_step(samples: list[dict], pad_token_id: int, max_tokens: int, model_cfg=None) -> list[dict]:
    """One optimizer step's samples of this rank, packed into as few rows of at most
    `max_tokens` tokens as first-fit finds (so the samples per micro-batch vary)."""
    from fastground.data.collate import pack_samples
    groups = pack_samples([int(s["input_ids"].numel()) for s in samples], max_tokens)
    return [collate([samples[i] for i in g], pad_token_id, True, max_tokens, model_cfg) for g in groups]


def finish_batch(batch: dict, model_cfg=None) -> dict:
    """Add what the model and trainer would otherwise compute on the device, each costing a
    host sync per micro-batch: the media-block check (on these CPU token ids), the answer
    positions and targets of the loss, and the token counts.

    answer_index: flat positions (into batch x length) whose next token is an answer token;
    answer_targets: those next tokens. _tokens: real tokens; _computed: tokens the LLM
    computes (padding included)."""
    ids, labels = batch["input_ids"], batch["labels"]
    if model_cfg is not None:
        from fastground.model.groundinggpt import check_media_blocks
        for modality, key in (("image", "images"), ("video", "videos"), ("sound", "sounds")):
            media = batch.get(key)
            check_media_blocks(ids, model_cfg, modality, 0 if media is None else media.shape[0])
        batch["media_checked"] = True
    b, length = labels.shape
    target = labels[:, 1:]
    pos = (target != IGNORE_INDEX).nonzero()
    batch["answer_index"] = pos[:, 0] * length + pos[:, 1]
    batch["answer_targets"] = target[pos[:, 0], pos[:, 1]]
    batch["n_answer"] = int(pos.shape[0])
    mask = batch.get("attention_mask")
    batch["_tokens"] = int(mask.sum()) if mask is not None else int(ids.numel())
    batch["_computed"] = int(ids.numel())
    return batch


def empty_batch(pad_token_id: int) -> dict:
    """A one-token micro-batch without answer tokens: a rank with fewer packed micro-batches
    than another runs these, so every rank makes the same collectives (ZeRO-2 reduces in
    every backward)."""
    batch = {"input_ids": torch.full((1, 1), pad_token_id, dtype=torch.long),
             "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.ones((1, 1), dtype=torch.long), "images": None, "videos": None,
             "sounds": None, "_skipped": 0, "_samples": 0}
    batch = finish_batch(batch)
    batch["media_checked"] = True
    batch["_tokens"] = batch["_computed"] = 0  # not data: counts neither as real nor as computed
    return batch


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of `(epoch, index)` for this rank, `accum` per optimizer step, from
    `start_step` on, forever (the trainer decides when to stop). An epoch contributes
    floor(rank samples / (micro x accum)) steps; its last partial step is dropped, as a
    sampler with drop_last would."""

    def __init__(self, sampler, micro: int, accum: int, start_step: int = 0, whole_steps: bool = False):
        self.sampler = sampler
        self.micro = micro
        self.accum = accum
        self.start_step = start_step
        self.whole_steps = whole_steps  # yield one list of micro x accum items per step (packing)
        self._steps: dict[int, int] = {}

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._steps:
            # With replay the epoch length is random (but fixed by the seed).
            saved = self.sampler.epoch
            self.sampler.set_epoch(epoch)
            self._steps[epoch] = len(self.sampler.rank_order()) // (self.micro * self.accum)
            self.sampler.set_epoch(saved)
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        epoch = 0
        while True:
            n = self.steps_in_epoch(epoch)
            if n == 0:
                raise ValueError(f"an epoch holds {len(self.sampler)} samples per process, fewer than one "
                                 f"step's {self.micro * self.accum} (micro batch x grad accum); use a "
                                 "smaller batch or more data")
            if step < n:
                return epoch, step
            step -= n
            epoch += 1

    def steps_for_epochs(self, epochs: int) -> int:
        self.locate(0)
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def sampler_state(self, step: int) -> dict:
        """StageMixSampler state after `step` optimizer steps (its position counts samples
        of this rank's epoch)."""
        epoch, s = self.locate(step)
        saved = (self.sampler.epoch, self.sampler.position)
        self.sampler.set_epoch(epoch)
        state = self.sampler.state_dict(position=s * self.micro * self.accum)
        self.sampler.epoch, self.sampler.position = saved
        return state

    def __iter__(self) -> Iterator[list]:
        epoch, s = self.locate(self.start_step)
        per_step = self.micro * self.accum
        while True:
            self.sampler.set_epoch(epoch)
            order = self.sampler.rank_order()
            for step in range(s, self.steps_in_epoch(epoch)):
                base = step * per_step
                if self.whole_steps:
                    yield [(epoch, int(i)) for i in order[base: base + per_step]]
                    continue
                for k in range(self.accum):
                    chunk = order[base + k * self.micro: base + (k + 1) * self.micro]
                    yield [(epoch, int(i)) for i in chunk]
            epoch, s = epoch + 1, 0


@dataclass
class TrainData:
    samples: StepSamples
    batches: StepBatches
    sampler: object
    n_current: int
    n_previous: int
    pad_token_id: int
    model_cfg: object = None

    def loader(self, start_step: int, num_workers: int, packed: bool, max_length: int, seed: int,
               pin_memory: bool, max_tokens: int | None = None) -> torch.utils.data.DataLoader:
        """Padded: one item per micro-batch, `accum` per step. Packed: one item per step, the
        list of its packed micro-batches (at most `max_tokens` tokens each)."""
        self.batches.start_step = start_step
        self.batches.whole_steps = packed
        if packed:
            fn = functools.partial(collate_step, pad_token_id=self.pad_token_id,
                                   max_tokens=max_tokens or self.batches.micro * max_length, model_cfg=self.model_cfg)
        else:
            fn = functools.partial(collate, pad_token_id=self.pad_token_id, packed=False,
                                   max_tokens=self.batches.micro * max_length, model_cfg=self.model_cfg)
        kwargs = dict(prefetch_factor=4, persistent_workers=False) if num_workers else {}
        if num_workers:
            from fastground.data.video import worker_start_method
            kwargs["multiprocessing_context"] = worker_start_method(self.samples.parts[0].video_backend)
        return torch.utils.data.DataLoader(
            self.samples, batch_sampler=self.batches, collate_fn=fn, num_workers=num_workers,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **kwargs)


def split_files(spec: str | None) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else []


def build_train_data(data: str, prev_data: str | None, alpha: float, tokenizer, model_cfg,
                     folders: dict, max_length: int, video_backend: str, max_bad_fraction: float,
                     seed: int, rank: int, world_size: int, micro: int, accum: int,
                     media_loaders: dict | None = None) -> TrainData:
    """media_loaders: replacement loaders per modality (the feature cache's); a "video" one
    has the SeededVideoLoader interface."""
    from fastground.data.dataset import GroundingDataset, MixedDataset
    from fastground.data.sampler import StageMixSampler

    loaders = dict(media_loaders or {})
    video_loader = loaders.setdefault("video", SeededVideoLoader())

    def dataset(files):
        return GroundingDataset(files, tokenizer, model_cfg, image_folder=folders.get("image"),
                                video_folder=folders.get("video"), sound_folder=folders.get("sound"),
                                max_length=max_length, train=True, video_backend=video_backend,
                                max_bad_fraction=max_bad_fraction, loaders=loaders)

    current = dataset(split_files(data))
    parts = [current]
    previous = None
    if prev_data and alpha > 0:
        previous = dataset(split_files(prev_data))
        parts.append(previous)
    n_prev = len(previous) if previous is not None else 0
    if len(current) == 0:
        raise ValueError(f"{data}: no samples")
    mixed = MixedDataset(current, previous if previous is not None else [])
    sampler = StageMixSampler(len(current), n_prev, alpha if n_prev else 0.0, seed, rank=rank,
                              world_size=world_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    return TrainData(StepSamples(mixed, parts, video_loader, seed), StepBatches(sampler, micro, accum),
                     sampler, len(current), n_prev, int(pad if pad is not None else 0), model_cfg)


def demo_paths(root: str, stage: int) -> dict:
    """Files of the demo set for `stage`: data, previous-stage data, media folders, tokenizer."""
    return dict(data=os.path.join(root, f"stage{stage}.json"),
                prev_data=os.path.join(root, f"stage{stage - 1}.json") if stage > 1 else None,
                # the JSON's media paths are relative to the root (images/..., videos/...)
                image=root, video=root, sound=root, tokenizer=os.path.join(root, "tokenizer"))


def batch_counts(batch: dict) -> tuple[int, int]:
    """(answer tokens the loss averages over, tokens through the LLM) of a micro-batch."""
    if "n_answer" in batch:
        return batch["n_answer"], batch["_tokens"]
    labels = batch["labels"]
    answer = int((labels[:, 1:] != IGNORE_INDEX).sum())
    mask = batch.get("attention_mask")
    seen = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return answer, seen

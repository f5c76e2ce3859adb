"""`python -m fastground.features`: run the frozen encoders once and store their outputs.

EVA, CLIP, ImageBind and the frame Q-Former never train, yet a run from media recomputes
them every step (most of stage 1's FLOPs). This writes, per media file of the training data,
what the trainable branches read: CLIP select-layer patch features per image, EVA +
ln_vision + frame Q-Former outputs (T, 32, 768) per video (one entry per training crop,
`--views K`), ImageBind clip features per sound, in the training dtype, into a cache
(fastground.data.feature_cache) that `python -m fastground.train --feature-cache DIR` reads.

Same options as the trainer for the data, media folders, starting weights and encoder
weight files (the trainer's own option definitions and loading code); the same launcher for
several processes (each takes every world-size-th media). Resumable: a rerun skips what is
stored; shards are written atomically.

    python -m fastground.features --stage 1 --out runs/features      # the demo data, tiny model
    python -m fastground.train --stage 1 --feature-cache runs/features
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from fastground.data.feature_cache import (IMAGE_VIEW, CachedLoader, CacheError, CacheSpec, FeatureCache,
                                           content_fingerprint, crop_view, preprocessing, weights_fingerprint)

log = logging.getLogger("fastground.features")
PROG = "python -m fastground.features"

# Trainer options that decide which media are read and which encoder weights run.
TRAINER_OPTIONS = ("stage", "data", "prev_data", "alpha", "image_folder", "video_folder", "sound_folder",
                   "demo_data", "model", "preset", "tokenizer", "output", "vision_tower", "eva", "qformer",
                   "imagebind", "precision", "seed", "video_backend", "num_workers", "fast_path")
MODALITIES = ("image", "video", "sound")


# ---------------------------------------------------------------------------- the work


@dataclass(frozen=True)
class Item:
    """One feature tensor to store: a media file (under its JSON path `key`) and a view."""
    modality: str
    key: str  # the media path as the JSON writes it, normalised
    view: str  # IMAGE_VIEW, or the video crop (feature_cache.crop_view)
    path: str  # where the file is read
    seed: int | None  # the video crop's seed (the trainer's convention)


def media_key(path: str, folder: str | None) -> str:
    """The cache key of a media file: its path relative to its media folder."""
    return os.path.normpath(os.path.relpath(path, folder) if folder else path)


def frozen_modules(model) -> list[tuple[str, object]]:
    """The frozen encoders of the model, from the one table of parts."""
    from fastground.model.detached import frozen_names
    return [(name, getattr(model.model, name)) for name in frozen_names()]


def move_frozen(model, device) -> None:
    """Move the frozen encoders (modules and bare parameters) to `device`, in place."""
    for _, part in frozen_modules(model):
        if isinstance(part, torch.nn.Module):
            part.to(device)
        else:
            part.data = part.data.to(device)


def encode(model, modality: str, media: torch.Tensor) -> torch.Tensor:
    """The frozen part of one branch on a batch of media."""
    inner = model.model
    if modality == "image":
        return inner.image_features(media)
    if modality == "video":
        return inner.frame_features(media)
    return inner.clip_features(media)


def cache_spec(cfg, model, views: int) -> CacheSpec:
    dtype = str(model.model.ln_vision.weight.dtype).replace("torch.", "")
    prep = preprocessing(model.config, cfg.video_backend)
    prep["video"]["frame_qformer"] = frame_qformer(model)
    return CacheSpec(weights_fingerprint(frozen_modules(model)), dtype, prep, int(cfg.seed), int(views))


def patch_like_trainer(cfg, model, device) -> None:
    """The frame Q-Former as the trainer would run it (Triton-fused where --fast-path is on),
    so features from the cache are those a run from media computes."""
    from fastground.train.fast_engine import apply_fast_path
    apply_fast_path(cfg, model, device)


def frame_qformer(model) -> str:
    return "fast" if type(model.model.Qformer).__module__.startswith("fastground.fast") else "reference"


def check_cacheable(model) -> None:
    if model.config.release_audio_train_mode:
        raise CacheError("release_audio_train_mode runs ImageBind with drop-path while training: its features "
                         "are not fixed, so they cannot be cached")


def plan(data: str, prev_data: str | None, alpha: float | None, folders: dict, model_cfg, seed: int,
         views: int) -> list[Item]:
    """Every feature tensor a training run on this data needs, deduplicated, in a fixed order:
    the trainer's sample index space (this stage's samples, then the replayed ones), video
    crops drawn per (seed, view, index) as the trainer draws them per (seed, epoch, index)."""
    from fastground.data.dataset import GroundingDataset, validate_entry
    from fastground.train.data import crop_seed, split_files

    sets = [split_files(data)]
    if prev_data and alpha:
        sets.append(split_files(prev_data))
    entries = []
    for files in sets:
        entries += GroundingDataset(files, None, model_cfg, image_folder=folders.get("image"),
                                    video_folder=folders.get("video"), sound_folder=folders.get("sound")).entries
    size = int(model_cfg.eva_image_size)
    seen, out = set(), []
    for index, entry in enumerate(entries):
        if validate_entry(entry) is not None:
            continue  # the trainer skips it too
        for m in MODALITIES:
            if m not in entry:
                continue
            folder = folders.get(m)
            path = os.path.join(folder, entry[m]) if folder else entry[m]
            key = media_key(path, folder)
            for k in range(views if m == "video" else 1):
                s = crop_seed(seed, k, index) if m == "video" else None
                view = crop_view(True, s, size) if m == "video" else IMAGE_VIEW
                if (m, key, view) not in seen:
                    seen.add((m, key, view))
                    out.append(Item(m, key, view, path, s))
    return out


_FP: dict[tuple, str] = {}


def fingerprint(path: str) -> str | None:
    """Content fingerprint, memoised per (path, size, mtime); None for a missing file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    k = (path, st.st_size, st.st_mtime_ns)
    fp = _FP.get(k)
    if fp is None:
        fp = _FP[k] = content_fingerprint(path)
    return fp


def missing(cache: FeatureCache, items: Sequence[Item]) -> list[Item]:
    return [it for it in items if not cache.has(it.modality, it.key, it.view, fingerprint(it.path) or "")]


class _Decode(torch.utils.data.Dataset):
    """Decodes one item with the trainer's own media loaders; a failure becomes a record."""

    def __init__(self, items: Sequence[Item], model_cfg, video_backend: str):
        self.items, self.cfg, self.backend = list(items), model_cfg, video_backend

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        try:
            content = fingerprint(it.path)
            if content is None:
                raise FileNotFoundError(f"{it.path}: file not found")
            if it.modality == "image":
                from fastground.data.image import load_image
                x = load_image(it.path, self.cfg, sample_id=it.key)
            elif it.modality == "video":
                from fastground.data.video import load_video
                x = load_video(it.path, self.cfg, train=True, seed=it.seed, backend=self.backend, sample_id=it.key)
            else:
                from fastground.data.audio import load_audio
                x = load_audio(it.path, self.cfg, sample_id=it.key)
            return i, content, x, None
        except Exception as e:  # counted and reported; the rest goes on
            return i, None, None, f"{type(e).__name__}: {e}"


def build(model, items: Sequence[Item], cache: FeatureCache, rank: int = 0, world: int = 1, batch: int = 8,
          shard_size: int = 256, num_workers: int = 0, progress: bool = True, video_backend: str = "pyav",
          device: torch.device | None = None) -> dict:
    """Encode this rank's share of `items` that the cache lacks and store them. Returns counts:
    written, skipped (already stored), failed (with the first reasons)."""
    from tqdm.auto import tqdm

    cache.remove_orphans(rank)
    mine = list(items)[rank::world]
    todo = missing(cache, mine)
    counts = {"written": 0, "skipped": len(mine) - len(todo), "failed": 0, "failures": [], "shards": 0}
    if not todo:
        return counts
    device = device if device is not None else next(model.model.ln_vision.parameters()).device
    loader = torch.utils.data.DataLoader(_Decode(todo, model.config, video_backend), batch_size=None,
                                         num_workers=num_workers, shuffle=False)
    bar = tqdm(total=len(todo), unit="media", dynamic_ncols=True, disable=not progress or rank != 0,
               desc=f"features (rank {rank}/{world})")
    pending: dict[str, list] = {m: [] for m in MODALITIES}
    done: list = []

    def run(modality: str, force: bool = False) -> None:
        group = pending[modality]
        while group and (force or len(group) >= batch):
            chunk, pending[modality] = group[:batch], group[batch:]
            group = pending[modality]
            with torch.no_grad():
                feats = encode(model, modality, torch.stack([x for _, _, x in chunk]).to(device))
            for (it, content, _), f in zip(chunk, feats):
                done.append((it.modality, it.key, it.view, content, f.clone()))

    def flush(force: bool = False) -> None:
        while len(done) >= shard_size or (force and done):
            cache.write_shard(rank, done[:shard_size])
            counts["written"] += len(done[:shard_size])
            counts["shards"] += 1
            del done[:shard_size]

    try:
        for i, content, x, err in loader:
            it = todo[i]
            bar.update(1)
            if err is not None:
                counts["failed"] += 1
                if len(counts["failures"]) < 20:
                    counts["failures"].append(f"{it.path}: {err}")
                log.warning("cannot read %s: %s", it.path, err)
                continue
            pending[it.modality].append((it, content, x))
            run(it.modality)
            flush()
        for m in MODALITIES:
            run(m, force=True)
        flush(force=True)
    finally:
        bar.close()
    return counts


# ---------------------------------------------------------------------------- the trainer's hooks


@dataclass
class TrainingCache:
    """A feature cache attached to a training run (`python -m fastground.train --feature-cache`)."""
    cache: FeatureCache
    loaders: dict  # GroundingDataset loaders reading the cache
    views: int
    filled: int  # media decoded and encoded by this run because the cache lacked them
    failed: int

    def note_epochs(self, total_steps: int, steps_per_epoch: int) -> None:
        epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
        if epochs > self.views:
            log.info("feature cache: %d epochs over %d stored view(s) per video: epoch e trains on view "
                     "e mod %d, so crops repeat from epoch %d (build with --views %d for fresh ones)",
                     epochs, self.views, self.views, self.views + 1, epochs)

    @staticmethod
    def detached(model) -> int:
        det = getattr(model, "detached_encoders", None)
        return det.numel if det is not None else 0

    def detach_encoders(self, model, output: str, rank: int) -> None:
        """The frozen encoders never run from here on: take them out of the model before the
        engine is made (never on the device, not held while training); rank 0 keeps one copy
        in the output folder, which every checkpoint copies (fastground.model.detached)."""
        from fastground.model.detached import FOLDER, detach_frozen
        from fastground.train.engine import _barrier
        names = ", ".join(name for name, _ in frozen_modules(model))
        det = detach_frozen(model, os.path.join(output, FOLDER), self.cache.spec.weights, write=rank == 0,
                            barrier=_barrier)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("feature cache: the frozen encoders (%s, %.1fM parameters) are not kept for training: read "
                 "once for the weights fingerprint, then taken out of the model (never on the device); "
                 "checkpoints copy them from %s",
                 names, det.numel / 1e6, det.directory)


def attach(cfg, model, data: str, prev_data: str | None, folders: dict, info) -> TrainingCache | None:
    """Check `cfg.feature_cache` against this run (encoder weights, dtype, preprocessing, crop
    seed), make sure it holds every media of the data (decoding and encoding the missing ones
    now, counted, or refusing them with --cache-strict), and switch the model to read features."""
    if not cfg.feature_cache:
        return None
    from fastground.train.engine import _all_reduce_sum, _barrier
    check_cacheable(model)
    root = cfg.feature_cache
    if not os.path.isdir(root):
        raise CacheError(f"--feature-cache {root}: directory not found; build it with {PROG} --out {root}")
    views = FeatureCache.open(root).spec.views
    cache = FeatureCache.open(root, cache_spec(cfg, model, views))
    items = plan(data, prev_data, cfg.alpha, folders, model.config, cfg.seed, views)
    # each rank checks (and fills) every world-size-th item; the count is the run's
    lacking = missing(cache, items[info.rank::info.world_size])
    n_lacking = int(_all_reduce_sum([float(len(lacking))], info.device)[0])
    filled = failed = 0
    if n_lacking:
        example = ", ".join(f"{it.modality} {it.key} ({it.view})" for it in lacking[:3]) or "on other ranks"
        if cfg.cache_strict:
            raise CacheError(f"{root}: {n_lacking} of the {len(items)} media features this run needs are not in "
                             f"the feature cache (or were made from other file contents), e.g. {example}; "
                             "complete it with python -m fastground.features, or drop --cache-strict")
        log.warning("feature cache %s lacks %d of %d media features (e.g. %s): decoding and encoding them from "
                    "their media now, into the cache", root, n_lacking, len(items), example)
        move_frozen(model, info.device)
        counts = build(model, lacking, cache, info.rank, 1, progress=cfg.progress, video_backend=cfg.video_backend,
                       device=info.device)
        filled, failed = (int(v) for v in _all_reduce_sum([counts["written"], counts["failed"]], info.device))
        _barrier()
        log.info("feature cache: %d media decoded and encoded from their files, %d unreadable (skipped and counted "
                 "in training)", filled, failed)
    model.media_features = True
    log.info("feature cache %s: %d entries, %d view(s) per video", root, len(cache), views)
    loaders = {m: CachedLoader(cache, m, folders.get(m), fingerprint) for m in MODALITIES}
    return TrainingCache(cache, loaders, views, filled, failed)


# ---------------------------------------------------------------------------- the CLI


def build_parser() -> argparse.ArgumentParser:
    from fastground.train.cli import build_parser as trainer_parser
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Run the frozen encoders (CLIP, EVA + frame Q-Former, ImageBind) once over a data "
                    "set and store their outputs for python -m fastground.train --feature-cache.",
        epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (created, or resumed)")
    p.add_argument("--views", type=int, default=1, metavar="K",
                   help="training crops stored per video; the trainer uses view epoch mod K (default: 1)")
    p.add_argument("--batch", type=int, default=8, metavar="N",
                   help="media per encoder call (default: 8). Kernels may round a batch of N differently from "
                        "a batch of 1 in the last bit; the features equal a run from media bit for bit where "
                        "both encode the same number of media per call")
    p.add_argument("--shard-size", type=int, default=256, metavar="N", help="entries per shard file (default: 256)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    # The trainer's own definitions of these options (same names, help and checks).
    for action in trainer_parser()._actions:
        if action.dest in TRAINER_OPTIONS:
            p._add_action(action)
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    return p


def parse(argv: Sequence[str] | None = None):
    from fastground.train.cli import ConfigError, validate, world_size_from_env
    from fastground.train.config import TrainConfig
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank", None)
    own = {k: ns.pop(k) for k in ("out", "views", "batch", "shard_size", "progress")}
    for k in ("views", "batch", "shard_size"):
        if own[k] <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be positive, got {own[k]}")
    try:
        cfg = validate(TrainConfig(**ns), world_size_from_env())
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg, own


def load_encoders(cfg, info):
    """The model exactly as the trainer builds it (weights, dtype), in eval mode, plus the
    resolved data files: (model, data, prev_data, folders)."""
    from fastground.train.engine import _data_files, _precision, build_model
    from fastground.data.tokenizer import load_tokenizer
    data, prev_data, folders, tok_dir = _data_files(cfg, info)
    tokenizer = load_tokenizer(tok_dir)
    model, source = build_model(cfg, tokenizer, _precision(cfg, info.device))
    check_cacheable(model)
    patch_like_trainer(cfg, model, info.device)
    model.eval().to(info.device)
    log.info("encoders of %s", source)
    return model, data, prev_data, folders


def main(argv: Sequence[str] | None = None) -> int:
    from fastground.train.cli import ConfigError
    from fastground.train.engine import _barrier, setup_distributed
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, own = parse(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    info = setup_distributed()
    t0 = time.perf_counter()
    try:
        model, data, prev_data, folders = load_encoders(cfg, info)
        spec = cache_spec(cfg, model, own["views"])
        if info.rank == 0:
            cache = FeatureCache.create_or_open(own["out"], spec)
        _barrier()
        if info.rank != 0:
            cache = FeatureCache.open(own["out"], spec, check_views=True)
        items = plan(data, prev_data, cfg.alpha, folders, model.config, cfg.seed, own["views"])
        workers = cfg.num_workers if cfg.num_workers is not None else (4 if info.device.type == "cuda" else 0)
        counts = build(model, items, cache, info.rank, info.world_size, own["batch"], own["shard_size"],
                       workers, own["progress"], cfg.video_backend)
    except CacheError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    _barrier()
    dt = time.perf_counter() - t0
    log.info("rank %d: %d media written (%.1f media/s), %d already stored, %d failed; cache %s holds %d entries",
             info.rank, counts["written"], counts["written"] / max(dt, 1e-9), counts["skipped"], counts["failed"],
             own["out"], len(cache))
    if counts["failed"]:
        log.warning("%d media could not be read, e.g. %s; training decodes them from media (and skips "
                    "the unreadable ones)", counts["failed"], counts["failures"][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

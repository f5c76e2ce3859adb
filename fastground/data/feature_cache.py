"""The frozen-encoder feature cache: what `python -m fastground.features` writes and
`python -m fastground.train --feature-cache DIR` reads.

Layout of a cache directory:

* `index.sqlite`: one `meta` row per setting the features depend on (encoder-weights
  fingerprint, dtype, per-modality preprocessing, the crop seed and number of views), one
  `shards` row per shard file (its byte size, so a truncated shard is caught on open) and one
  `entries` row per stored feature tensor, keyed by (modality, media path as the JSON writes
  it, view) with the file's content fingerprint.
* `shards/r{rank}-{n}.safetensors`: the tensors, in the training dtype. A shard is written
  to a temporary name and renamed into place before its index rows are committed in one
  transaction, so a crash leaves either a whole shard with its rows or neither (an orphan
  file without rows is removed by the next run of its rank).

Views: an image or a sound has one ("-"); a video has one per training crop, named by the
crop on the S x S grid of the resize view (`crop_view`), so two samples that share a video
and a crop share the entry, and a cache made with another seed simply has no such view.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

FORMAT_VERSION = 1
INDEX = "index.sqlite"
SHARDS = "shards"
IMAGE_VIEW = "-"
# Bytes read from each end of a media file for its content fingerprint (with its size):
# a changed, re-encoded or truncated file is caught without reading whole videos, and a
# trainer checking a million files reads 128 KiB of each.
FINGERPRINT_SPAN = 64 << 10


def _data_error():
    from fastground.data.dataset import DataError
    return DataError


class CacheError(_data_error()):
    """A feature cache that cannot serve this run; the message says what differs. A DataError,
    so the trainer's command line reports it in one line."""


# ------------------------------------------------------------------------- keys


def content_fingerprint(path: str) -> str:
    """blake2b of the file's size and its first and last FINGERPRINT_SPAN bytes."""
    h = hashlib.blake2b(digest_size=16)
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            f.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            h.update(f.read())
    return h.hexdigest()


def weights_fingerprint(modules: Iterable[tuple[str, Any]]) -> str:
    """blake2b over names, dtypes, shapes and bytes of the frozen encoders' tensors."""
    h = hashlib.blake2b(digest_size=16)
    for prefix, mod in modules:
        tensors = mod.state_dict().items() if hasattr(mod, "state_dict") else [("", mod)]
        for name, t in sorted(tensors):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def crop_view(train: bool, seed: int | None, size: int) -> str:
    """The crop on the S x S view grid a video's frames are drawn from ("eval" or
    "t{top}l{left}h{h}w{w}"), with the video loader's own rule (fastground.data.video)."""
    if not train:
        return "eval"
    from fastground.data.video import _random_resized_crop
    top, left, h, w = _random_resized_crop(np.random.default_rng(seed), int(size))
    return f"t{top}l{left}h{h}w{w}"


def preprocessing(cfg, video_backend: str, resize_mode: str = "squash") -> dict:
    """What the frozen features of each modality depend on besides the weights."""
    return {
        "image": {"size": int(cfg.clip_image_size), "select_layer": int(cfg.mm_vision_select_layer),
                  "resize": "expand2square+clip"},
        "video": {"frames": int(cfg.num_frames), "size": int(cfg.eva_image_size), "resize_mode": resize_mode,
                  "decoder": video_backend, "query_tokens": int(cfg.num_query_token)},
        "sound": {"clips": int(cfg.num_audio_clips), "clip_seconds": float(cfg.audio_clip_seconds),
                  "mel_bins": int(cfg.audio_num_mel_bins), "target_len": int(cfg.audio_target_len)},
    }


@dataclass(frozen=True)
class CacheSpec:
    """Everything a cache's features depend on; two specs must be equal to share a cache."""
    weights: str  # weights_fingerprint of the frozen encoders
    dtype: str  # "float32" / "bfloat16"
    preprocessing: dict
    seed: int  # the training seed the video crops are drawn from
    views: int  # training crops per video

    def as_meta(self) -> dict[str, str]:
        return {"format": str(FORMAT_VERSION), "weights": self.weights, "dtype": self.dtype,
                "preprocessing": json.dumps(self.preprocessing, sort_keys=True),
                "seed": str(self.seed), "views": str(self.views)}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> "CacheSpec":
        return cls(meta["weights"], meta["dtype"], json.loads(meta["preprocessing"]), int(meta["seed"]),
                   int(meta["views"]))


def _differences(have: CacheSpec, want: CacheSpec, use_views: bool = True) -> list[str]:
    out = []
    if have.weights != want.weights:
        out.append(f"encoder weights (cache fingerprint {have.weights[:12]}, this run's {want.weights[:12]})")
    if have.dtype != want.dtype:
        out.append(f"dtype (cache {have.dtype}, this run {want.dtype})")
    for modality in sorted(set(have.preprocessing) | set(want.preprocessing)):
        a, b = have.preprocessing.get(modality, {}), want.preprocessing.get(modality, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{modality} preprocessing {k} (cache {a.get(k)!r}, this run {b.get(k)!r})")
    if have.seed != want.seed:
        out.append(f"seed of the video crops (cache {have.seed}, this run {want.seed})")
    if use_views and have.views != want.views:
        out.append(f"views per video (cache {have.views}, this run {want.views})")
    return out


# ------------------------------------------------------------------------ storage


class FeatureCache:
    """One cache directory. Opened for reading (`open`) or writing (`create_or_open`); safe to
    use from forked DataLoader workers (connections and shard handles are per process)."""

    def __init__(self, root: str, spec: CacheSpec):
        self.root = root
        self.spec = spec
        self._pid = None
        self._db = None
        self._handles: dict[str, Any] = {}

    # ---------------------------------------------------------------- opening
    @staticmethod
    def _connect(root: str) -> sqlite3.Connection:
        db = sqlite3.connect(os.path.join(root, INDEX), timeout=120, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 120000")
        return db

    @classmethod
    def exists(cls, root: str) -> bool:
        return os.path.isfile(os.path.join(root, INDEX))

    @classmethod
    def open(cls, root: str, want: CacheSpec | None = None, check_views: bool = False) -> "FeatureCache":
        """Open an existing cache; with `want`, refuse one made with other weights, dtype or
        preprocessing, naming what differs. Every shard's size is checked against the index."""
        if not cls.exists(root):
            raise CacheError(f"{root}: not a feature cache (no {INDEX}); build one with python -m fastground.features")
        db = cls._connect(root)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise CacheError(f"{os.path.join(root, INDEX)}: unreadable index ({e})") from None
        finally:
            db.close()
        if meta.get("format") != str(FORMAT_VERSION):
            raise CacheError(f"{root}: cache format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
        cache = cls(root, CacheSpec.from_meta(meta))
        if want is not None:
            diff = _differences(cache.spec, want, check_views)
            if diff:
                raise CacheError(f"{root}: the feature cache was made with other settings: {'; '.join(diff)}. "
                                 "Rebuild it (python -m fastground.features ... --out a new folder) or train "
                                 "without --feature-cache")
        damaged = cache.damaged_shards()
        if damaged:
            name, have, want_size = damaged[0]
            raise CacheError(f"{os.path.join(root, SHARDS, name)}: {have} bytes, the index recorded {want_size}: "
                             f"truncated or damaged ({len(damaged)} shard(s)); rerun python -m fastground.features "
                             "with the same options to recompute their entries")
        return cache

    @classmethod
    def create_or_open(cls, root: str, spec: CacheSpec) -> "FeatureCache":
        """For writing: a new cache with `spec`, or an existing one made with the same spec
        (whose damaged shards' entries are dropped so they are recomputed)."""
        os.makedirs(os.path.join(root, SHARDS), exist_ok=True)
        db = cls._connect(root)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, bytes INTEGER NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS entries (modality TEXT NOT NULL, path TEXT NOT NULL, "
                       "view TEXT NOT NULL, content TEXT NOT NULL, shard TEXT NOT NULL, key TEXT NOT NULL, "
                       "PRIMARY KEY (modality, path, view))")
            if not db.execute("SELECT 1 FROM meta LIMIT 1").fetchone():
                db.executemany("INSERT INTO meta VALUES (?, ?)", spec.as_meta().items())
            db.execute("COMMIT")
        finally:
            db.close()
        db = cls._connect(root)
        try:
            cache = cls(root, CacheSpec.from_meta(dict(db.execute("SELECT key, value FROM meta"))))
        finally:
            db.close()
        diff = _differences(cache.spec, spec)
        if diff:
            raise CacheError(f"{root}: an existing feature cache made with other settings: {'; '.join(diff)}; "
                             "write to another --out folder")
        for name, _, _ in cache.damaged_shards():
            cache._drop_shard(name)
        return cache

    def db(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # a forked worker: its own connection and file handles
            self._pid, self._db, self._handles = os.getpid(), self._connect(self.root), {}
        return self._db

    def damaged_shards(self) -> list[tuple[str, int, int]]:
        out = []
        for name, size in self.db().execute("SELECT name, bytes FROM shards ORDER BY name"):
            path = os.path.join(self.root, SHARDS, name)
            have = os.path.getsize(path) if os.path.exists(path) else 0
            if have != size:
                out.append((name, have, size))
        return out

    def _drop_shard(self, name: str) -> None:
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM entries WHERE shard = ?", (name,))
        db.execute("DELETE FROM shards WHERE name = ?", (name,))
        db.execute("COMMIT")
        try:
            os.remove(os.path.join(self.root, SHARDS, name))
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------- reading
    def lookup(self, modality: str, path: str, view: str) -> tuple[str, str, str] | None:
        """(content fingerprint, shard, key) of an entry, or None."""
        return self.db().execute("SELECT content, shard, key FROM entries WHERE modality = ? AND path = ? "
                                 "AND view = ?", (modality, path, view)).fetchone()

    def has(self, modality: str, path: str, view: str, content: str) -> bool:
        row = self.lookup(modality, path, view)
        return row is not None and row[0] == content

    def get(self, modality: str, path: str, view: str, content: str | None = None) -> torch.Tensor | None:
        """The stored features, or None when the entry is missing or was made from a file
        with another content fingerprint (when `content` is given)."""
        row = self.lookup(modality, path, view)
        if row is None or (content is not None and row[0] != content):
            return None
        _, shard, key = row
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open
            try:
                handle = safe_open(os.path.join(self.root, SHARDS, shard), framework="pt")
            except Exception as e:
                raise CacheError(f"{os.path.join(self.root, SHARDS, shard)}: unreadable shard ({e})") from None
            self._handles[shard] = handle
        return handle.get_tensor(key)

    def entries(self) -> list[tuple[str, str, str]]:
        return self.db().execute("SELECT modality, path, view FROM entries ORDER BY modality, path, view").fetchall()

    def __len__(self) -> int:
        return int(self.db().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    # ---------------------------------------------------------------- writing
    def remove_orphans(self, rank: int) -> int:
        """Shard files of `rank` the index does not list (a run killed between the rename and
        the commit) and temporary files it left."""
        known = {n for (n,) in self.db().execute("SELECT name FROM shards")}
        removed = 0
        for name in os.listdir(os.path.join(self.root, SHARDS)):
            mine = name.startswith(f"r{rank}-") or name.startswith(f".r{rank}-")
            if mine and name not in known:
                os.remove(os.path.join(self.root, SHARDS, name))
                removed += 1
        return removed

    def write_shard(self, rank: int, items: Sequence[tuple[str, str, str, str, torch.Tensor]]) -> str:
        """Write (modality, path, view, content, tensor) items as one new shard, atomically."""
        from safetensors.torch import save_file
        shard_dir = os.path.join(self.root, SHARDS)
        n = 0
        while True:
            name = f"r{rank}-{n:06d}.safetensors"
            if not os.path.exists(os.path.join(shard_dir, name)):
                break
            n += 1
        tensors = {f"t{i}": t.detach().contiguous().cpu() for i, (*_, t) in enumerate(items)}
        fd, tmp = tempfile.mkstemp(prefix=f".r{rank}-", suffix=".tmp", dir=shard_dir)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            final = os.path.join(shard_dir, name)
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO shards VALUES (?, ?)", (name, os.path.getsize(final)))
        db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                       [(m, p, v, c, name, f"t{i}") for i, (m, p, v, c, _) in enumerate(items)])
        db.execute("COMMIT")
        return name

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db, self._pid, self._handles = None, None, {}

    def __getstate__(self):  # pickled into spawned workers: reopen there
        return {"root": self.root, "spec": self.spec, "_pid": None, "_db": None, "_handles": {}}


# ------------------------------------------------------------------- the trainer's side


class NotCachedError(OSError):
    """A media file whose features the cache lacks (or holds for other file contents): the
    dataset skips and counts the sample, as any unreadable media."""


class CachedLoader:
    """A GroundingDataset media loader that returns the stored frozen features of a file
    instead of decoding it. For videos it also has the SeededVideoLoader interface: the
    trainer sets `seed` per item from `item_seed(seed, epoch, index)`, which reads view
    `epoch mod views`."""

    def __init__(self, cache: FeatureCache, modality: str, folder: str | None, fingerprint):
        self.cache = cache
        self.modality = modality
        self.folder = folder
        self.fingerprint = fingerprint  # path -> content fingerprint (memoised by the caller)
        self.views = cache.spec.views
        self.seed: int | None = None

    def item_seed(self, seed: int, epoch: int, index: int) -> int:
        from fastground.train.data import crop_seed
        return crop_seed(seed, epoch % self.views, index)

    def __call__(self, path, cfg, train=False, seed=None, backend=None, sample_id=None, **_):
        key = os.path.normpath(os.path.relpath(path, self.folder) if self.folder else path)
        view = IMAGE_VIEW
        if self.modality == "video":
            view = crop_view(train, self.seed if seed is None else seed, int(cfg.eva_image_size))
        content = self.fingerprint(path)
        x = self.cache.get(self.modality, key, view, content)
        if x is None:
            raise NotCachedError(f"{self.modality} features of {key} (view {view}) are not in the feature cache "
                                 f"{self.cache.root}" + (" for this file's contents" if self.cache.lookup(
                                     self.modality, key, view) else ""))
        return x

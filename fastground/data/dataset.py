"""Lazy LLaVA-style JSON dataset: conversations -> ids/labels, media -> tensors on access.

Only the JSON is read up front. Every entry is checked when it is first used (or all at once
with `validate()`), so one malformed line of a million-entry file costs a skipped sample in
training instead of a crash hours in; in evaluation (train=False) every error propagates,
naming the sample id, the JSON file and entry index, and the media file.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from fastground.config import MEDIA_TOKENS, PLACEHOLDERS
from fastground.data.conversation import (GPT, HUMAN, IGNORE_INDEX, MODALITIES, ConversationError,
                                          SampleTooLongError, count_placeholders, preprocess)

logger = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that cannot be loaded; names the sample, where it is defined and the file."""

    def __init__(self, problem: str, *, sample_id: Any = None, json_path: str | None = None,
                 index: int | None = None, media_path: str | None = None):
        self.problem = problem
        self.sample_id = sample_id
        self.json_path = json_path
        self.index = index
        self.media_path = media_path
        if sample_id is None and json_path is None and media_path is None:
            # Also how torch's DataLoader re-raises a worker's error: type(exc)(message).
            super().__init__(problem)
            return
        where = f"sample {sample_id!r}"
        if json_path is not None:
            where += f" (entry {index} of {json_path})"
        if media_path is not None:
            where += f", file {media_path}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # The default pickling (cls(*args)) would drop the fields on the way out of a worker.
        return (_rebuild_sample_error, (type(self), self.problem, self.sample_id, self.json_path,
                                        self.index, self.media_path))


def _rebuild_sample_error(cls, problem, sample_id, json_path, index, media_path):
    return cls(problem, sample_id=sample_id, json_path=json_path, index=index, media_path=media_path)


class DataError(RuntimeError):
    """Too many samples of a data set failed to load: the run stops with the list."""


class SchemaError(SampleError):
    """An entry whose JSON does not have the expected shape."""


@dataclass
class BadSampleLog:
    """What training skipped: how many, out of how many tries, and why (first `keep` kept)."""

    attempts: int = 0
    count: int = 0
    records: list = field(default_factory=list)
    keep: int = 1000

    def add(self, sample_id: Any, reason: str) -> None:
        self.count += 1
        if len(self.records) < self.keep:
            self.records.append((sample_id, reason))

    @property
    def fraction(self) -> float:
        return self.count / self.attempts if self.attempts else 0.0

    @property
    def ids(self) -> list:
        return [sid for sid, _ in self.records]

    def __len__(self) -> int:
        return self.count

    def summary(self, n: int = 5) -> str:
        head = "; ".join(f"{sid!r}: {why}" for sid, why in self.records[:n])
        more = f" (+{self.count - n} more)" if self.count > n else ""
        return head + more


def validate_entry(entry: Any) -> str | None:
    """What is wrong with one JSON entry, or None."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, expected an object"
    if "id" in entry and (isinstance(entry["id"], bool) or not isinstance(entry["id"], (str, int))):
        return f"'id' must be a string or an integer, got {entry['id']!r:.80}"
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "'conversations' must be a non-empty list of turns" + (
            "" if "conversations" in entry else " (key missing)")
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return f"turn {j} is a {type(turn).__name__}, expected an object"
        if turn.get("from") not in (HUMAN, GPT):
            return f"turn {j} has 'from'={turn.get('from')!r}, expected 'human' or 'gpt'"
        if not isinstance(turn.get("value"), str):
            return f"turn {j} has no string 'value'"
    for m in MODALITIES:
        if m in entry and (not isinstance(entry[m], str) or not entry[m]):
            return f"'{m}' must be a non-empty relative path, got {entry[m]!r:.80}"
    for j, turn in enumerate(conv):
        for tok in MEDIA_TOKENS:
            if tok in turn["value"]:
                # The tokenizer reads it as the special token itself: a media position with
                # no media behind it (or a second block) would corrupt the embedding splice.
                return (f"turn {j} contains the media token {tok!r} as text; write the placeholder "
                        f"({', '.join(PLACEHOLDERS.values())}) instead, or remove it")
    counts = count_placeholders(conv)
    for m in MODALITIES:
        want = 1 if m in entry else 0
        if counts[m] != want:
            ph = PLACEHOLDERS[m]
            if want:
                return (f"has a '{m}' file but {counts[m]} {ph} placeholders in its conversation "
                        f"(need exactly 1)")
            return f"has {counts[m]} {ph} placeholder(s) but no '{m}' file"
    return None


def _default_loader(modality: str) -> Callable:
    # Imported on first use: the media stack (PIL, av, fbank) is not needed for text-only data.
    if modality == "image":
        from fastground.data.image import load_image
        return load_image
    if modality == "video":
        from fastground.data.video import load_video
        return load_video
    from fastground.data.audio import load_audio
    return load_audio


def _media_error_types() -> tuple:
    try:
        from fastground.data.errors import MediaError
    except ImportError:
        return ()
    return (MediaError,)


class GroundingDataset:
    """Samples of one or more JSON files (a list, or paths joined by commas, as the release).

    Items: dict(id, input_ids, labels, image (3,S,S) | None, video (3,T,H,W) | None,
    sound (clips,1,128,204) | None).

    In training, a sample that fails (any exception while reading its entry, tokenising its
    text or decoding its media; no answer token left after truncation; non-finite media
    features) is replaced by the next loadable one and recorded in `bad_samples` with its id
    and file; DataError stops the run once more than `max_bad_fraction` of the tries failed
    (evaluated after every try, success or failure, from `min_tries_before_check` tries on;
    the trainer checks the whole run's fraction again at each epoch's end), since a
    systematic problem (wrong folder, broken decoder) would otherwise train silently on a
    biased subset. Each DataLoader worker keeps its own
    count. `loaders` maps a modality to a replacement loader with the default's signature.
    """

    def __init__(self, json_paths: str | Sequence[str], tokenizer, cfg,
                 image_folder: str | None = None, video_folder: str | None = None,
                 sound_folder: str | None = None, max_length: int = 2048, train: bool = True,
                 video_backend: str = "pyav", max_bad_fraction: float = 0.05,
                 min_tries_before_check: int = 20, loaders: dict | None = None):
        if isinstance(json_paths, str):
            json_paths = [p for p in json_paths.split(",") if p.strip()]
        json_paths = [p.strip() for p in json_paths]
        if not json_paths:
            raise ValueError("GroundingDataset needs at least one JSON file")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.json_paths = json_paths
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.folders = {"image": image_folder, "video": video_folder, "sound": sound_folder}
        self.max_length = max_length
        self.train = train
        self.video_backend = video_backend
        self.max_bad_fraction = max_bad_fraction
        self.min_tries_before_check = min_tries_before_check
        self.loaders = dict(loaders or {})
        self.bad_samples = BadSampleLog()
        self._bad_indices: set[int] = set()

        self.entries: list = []
        self._starts: list[int] = []
        for path in json_paths:
            data = self._read_json(path)
            self._starts.append(len(self.entries))
            self.entries.extend(data)

    @staticmethod
    def _read_json(path: str) -> list:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: dataset JSON file not found")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of samples, got a {type(data).__name__}")
        return data

    def __len__(self) -> int:
        return len(self.entries)

    def locate(self, index: int) -> tuple[str, int]:
        """(JSON file, index inside it) of a global index."""
        f = bisect.bisect_right(self._starts, index) - 1
        return self.json_paths[f], index - self._starts[f]

    def sample_id(self, index: int) -> Any:
        entry = self.entries[index]
        if isinstance(entry, dict) and isinstance(entry.get("id"), (str, int)) \
                and not isinstance(entry.get("id"), bool):
            return entry["id"]
        path, local = self.locate(index)
        return f"{os.path.basename(path)}#{local}"

    def validate(self, raise_first: bool = False) -> list[SchemaError]:
        """Check every entry's schema without touching media; returns the errors found."""
        errors = []
        for i, entry in enumerate(self.entries):
            problem = validate_entry(entry)
            if problem is not None:
                path, local = self.locate(i)
                err = SchemaError(problem, sample_id=self.sample_id(i), json_path=path, index=local)
                if raise_first:
                    raise err
                errors.append(err)
        return errors

    # ------------------------------------------------------------------ access
    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        if not self.train:
            return self.load(index)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad_indices:
                continue
            self.bad_samples.attempts += 1
            try:
                sample = self.load(j)
            except SampleError as e:
                self._bad_indices.add(j)
                self.bad_samples.add(e.sample_id, str(e))
                logger.warning("skipping %s", e)
                self._check_bad_fraction()
                continue
            # Evaluated on every sample, not only on failures: a data set whose failures all
            # came early must still stop once enough tries are in.
            self._check_bad_fraction()
            return sample
        raise DataError(f"no sample of the {n} in {', '.join(self.json_paths)} could be loaded; "
                           f"failures: {self.bad_samples.summary()}")

    def _check_bad_fraction(self) -> None:
        log = self.bad_samples
        if log.attempts >= min(self.min_tries_before_check, len(self)) \
                and log.fraction > self.max_bad_fraction:
            raise DataError(
                f"{log.count} of {log.attempts} samples tried failed to load "
                f"({log.fraction:.1%} > max_bad_fraction={self.max_bad_fraction:.1%}) in "
                f"{', '.join(self.json_paths)}; check the media folders "
                f"{ {m: f for m, f in self.folders.items() if f} } and the JSON. "
                f"First failures: {log.summary()}")

    def load(self, index: int) -> dict:
        """One sample, every problem raised as SampleError (SchemaError for a bad entry)."""
        entry = self.entries[index]
        sid = self.sample_id(index)
        json_path, local = self.locate(index)
        where = dict(sample_id=sid, json_path=json_path, index=local)

        problem = validate_entry(entry)
        if problem is not None:
            raise SchemaError(problem, **where)
        try:
            # The template the model config records (lego when none): fastground.data.templates.
            input_ids, labels = preprocess(entry["conversations"], self.tokenizer, self.cfg,
                                           self.max_length, sample_id=sid)
        except SampleTooLongError as e:
            raise SampleError(e.problem, **where) from e
        except ConversationError as e:
            raise SchemaError(e.problem, **where) from e
        except Exception as e:  # the tokenizer rejecting the text, or anything else in it
            raise SampleError(f"cannot tokenise the conversation ({type(e).__name__}: {e})", **where) from e
        if not bool((labels != IGNORE_INDEX).any()):
            cut = self.max_length is not None and len(input_ids) >= self.max_length
            raise SampleError(
                f"no answer token left after truncation to max_length={self.max_length}" if cut
                else "no answer token to learn from (every answer is empty)", **where)

        out = {"id": sid, "input_ids": input_ids, "labels": labels,
               "image": None, "video": None, "sound": None}
        media_errors = _media_error_types() + (OSError,)
        for m in MODALITIES:
            if m not in entry:
                continue
            folder = self.folders[m]
            path = os.path.join(folder, entry[m]) if folder else entry[m]
            if not os.path.exists(path):
                raise SampleError(f"{m} file not found", media_path=path, **where)
            try:
                out[m] = self._load_media(m, path, sid)
            except media_errors as e:
                problem = getattr(e, "problem", None) or f"{type(e).__name__}: {e}"
                raise SampleError(f"cannot load the {m}: {problem}", media_path=path, **where) from e
            except Exception as e:  # a decoder bug or an odd file: still this sample's problem
                raise SampleError(f"cannot load the {m} ({type(e).__name__}: {e})", media_path=path,
                                  **where) from e
            x = out[m]
            if torch.is_tensor(x) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise SampleError(f"the {m} features hold {bad} non-finite value(s) (NaN or inf)",
                                  media_path=path, **where)
        return out

    def _load_media(self, modality: str, path: str, sid: Any):
        fn = self.loaders.get(modality)
        if fn is None:
            fn = self.loaders[modality] = _default_loader(modality)
        if modality == "video":
            return fn(path, self.cfg, train=self.train, seed=None, backend=self.video_backend,
                      sample_id=sid)
        return fn(path, self.cfg, sample_id=sid)


class MixedDataset:
    """Indices [0, len(current)) read `current`, the rest read `previous` (StageMixSampler's
    index space)."""

    def __init__(self, current, previous):
        self.current = current
        self.previous = previous

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def __getitem__(self, index: int):
        n = len(self.current)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixed dataset of {len(self)}")
        return self.current[index] if index < n else self.previous[index - n]

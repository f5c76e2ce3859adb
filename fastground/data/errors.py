"""The one error type of the media loaders.

A bad file in a dataset of millions must be found from the log line alone, so the
message always carries the sample id (when the caller knows it), the file and what is
wrong with it: "sample 1234: videos/abc.webm: video has only 3 frames, 64 asked".
"""
from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["MediaError", "check_media_file"]


class MediaError(ValueError):
    """A media file that cannot be turned into model input.

    Fields: `path` (the file as given), `problem` (what is wrong, in words) and
    `sample_id` (the dataset sample, or None when the loader was called without one).
    """

    def __init__(self, path: Any, problem: Optional[str] = None,
                 sample_id: Any = None) -> None:
        if problem is None:
            # torch's DataLoader re-raises a worker's exception as `type(exc)(message)`;
            # accepting a lone message keeps the type (and `except MediaError`) intact
            # across worker processes instead of degrading to RuntimeError.
            path, problem = "", str(path)
        self.path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        self.problem = str(problem)
        self.sample_id = sample_id
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.path}: " if self.path else ""
        who = f"sample {self.sample_id}: " if self.sample_id is not None else ""
        return f"{who}{where}{self.problem}"

    def with_sample(self, sample_id: Any) -> "MediaError":
        """The same error naming `sample_id`, for callers that learn the id later."""
        return MediaError(self.path, self.problem, sample_id)

    def __reduce__(self):
        # Exceptions pickle as `cls(*self.args)` by default, which would pass the whole
        # message as `path`; rebuild from the fields instead.
        return (MediaError, (self.path, self.problem, self.sample_id))


def check_media_file(path: str, kind: str, sample_id: Any = None) -> None:
    """The checks every loader makes before decoding: exists, is a file, is not empty."""
    if not os.path.exists(path):
        raise MediaError(path, "file not found", sample_id)
    if os.path.isdir(path):
        raise MediaError(path, f"is a directory, not {kind} file", sample_id)
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty file (0 bytes)", sample_id)

"""Who owns a run directory, and what of an earlier run in it may be removed (and when).

Guarantees (docs/TRAINING.md repeats them for users):

* One trainer per `--output`: rank 0 holds an exclusive `flock` on `<output>/.lock` for the
  whole run and writes its pid, host and run id into it. A second trainer refuses with one
  line naming the holder. The kernel drops a flock when its process dies (SIGKILL, OOM
  kill, power loss of the host), so a dead run's lock file is taken over without asking.
* Nothing of an earlier run is removed before the new run has passed every check and
  written its first checkpoint: the earlier checkpoints are only *noted* when the run starts
  (`note_earlier_run`) and removed right after the new run's first checkpoint is complete
  (`drop_earlier_run`, called by the checkpoint writer). A run that stops before that leaves
  them untouched.
* `metrics.jsonl` is only ever appended to; every line carries the id of the run that wrote
  it (`run_id`).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import uuid

log = logging.getLogger("fastground.train")

LOCK_NAME = ".lock"

_RUN_ID: str | None = None
_EARLIER: dict[str, list[str]] = {}  # output (absolute) -> earlier run's checkpoint dirs
_LOCKED: dict[str, str] = {}  # output (absolute) -> run id of the lock this process holds


class OutputBusyError(RuntimeError):
    """Another live trainer holds the output directory."""


def run_id() -> str:
    """The id of the run this process is on (made on first use)."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-"
                   + uuid.uuid4().hex[:6])
    return _RUN_ID


def new_run_id() -> str:
    global _RUN_ID
    _RUN_ID = None
    return run_id()


def begin_run(output: str) -> str:
    """Called when a run starts writing to `output`: keeps the id its lock recorded, else (a
    run started through the Python API, several per process) makes a new one."""
    if _LOCKED.get(os.path.abspath(output)) == _RUN_ID and _RUN_ID is not None:
        return _RUN_ID
    return new_run_id()


class OutputLock:
    """An exclusive lock on a run directory, held until `release()` or process exit."""

    def __init__(self, output: str):
        self.output = output
        self.path = os.path.join(output, LOCK_NAME)
        self.fd: int | None = None
        self.took_over: dict | None = None

    def acquire(self) -> "OutputLock":
        os.makedirs(self.output, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            who = _describe(holder) if holder else "another process"
            raise OutputBusyError(f"--output {self.output} is in use by {who}; wait for it to finish, "
                                  "stop it, or choose another --output") from None
        previous = _read_holder(fd)
        if previous and previous.get("pid") is not None and \
                (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
            # We got the flock, so whoever wrote this no longer holds it: its process ended
            # without releasing (killed), and the kernel dropped the flock with it.
            self.took_over = previous
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        _LOCKED[os.path.abspath(self.output)] = info["run_id"]
        if self.took_over:
            log.warning("%s: took over the lock left by %s, which is no longer running", self.output,
                        _describe(self.took_over))
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        _LOCKED.pop(os.path.abspath(self.output), None)
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict) -> str:
    since = f", started {holder['started']}" if holder.get("started") else ""
    run = f", run {holder['run_id']}" if holder.get("run_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{run}{since}"


def acquire(output: str) -> OutputLock:
    return OutputLock(output).acquire()


# ---------------------------------------------------------------------------- earlier runs
def note_earlier_run(output: str, checkpoints: list[str]) -> None:
    """A fresh run (no --resume) found these checkpoints: they go once it has its own."""
    key = os.path.abspath(output)
    if checkpoints:
        _EARLIER[key] = list(checkpoints)
        log.warning("%s holds %d checkpoint(s) of an earlier run; they are kept until this run has written "
                    "its first checkpoint, then removed (stop now and pass --resume to continue that run "
                    "instead)", output, len(checkpoints))
    else:
        _EARLIER.pop(key, None)


def drop_earlier_run(output: str, keep: set[str] = frozenset()) -> int:
    """Remove the noted checkpoints of an earlier run; returns how many. Called by the
    checkpoint writer right after this run's first checkpoint is in place."""
    paths = _EARLIER.pop(os.path.abspath(output), [])
    n = 0
    for p in paths:
        if os.path.abspath(p) in keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    if n:
        log.info("%s: removed %d checkpoint(s) of the earlier run", output, n)
    return n

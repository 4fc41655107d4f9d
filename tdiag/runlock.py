"""One writer per run folder: a lock that dies with its process.

The Monitor (rank 0) holds an exclusive ``fcntl.flock`` on ``RUN_DIR/.tdiag.lock`` from
its start to its close; the kernel drops it when the process ends, however it ends
(``kill -9`` included), so a stale lock cannot block a resume. The file itself holds the
holder's pid, host and start time, for the message that refuses a second writer. The report
asks :func:`lock_holder` whether a run without an end entry in meta.json is still running
(the lock is held) or ended without closing (crashed or killed).

Without ``fcntl`` (Windows) there is no lock: :func:`acquire` returns a no-op lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from tdiag.findings import TdiagError

__all__ = ["LOCK_FILE", "RunDirInUse", "RunLock", "acquire", "lock_holder"]

LOCK_FILE = ".tdiag.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunDirInUse(TdiagError):
    """Another live process is writing this run folder."""


class RunLock:
    """A held lock (``release()`` or process exit drops it)."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self._fd, self.path = fd, path

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def acquire(run_dir: str | Path) -> RunLock:
    """Take the run folder's lock, or raise :class:`RunDirInUse` naming the holder.

    Raises:
        RunDirInUse: a live process holds it.
        OSError: the lock file cannot be created (the caller decides what that means).
    """
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None:  # pragma: no cover
        return RunLock(None, path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = _read_info(path)
        who = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
        since = info.get("start_time")
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
        raise RunDirInUse(
            f"{run_dir} is being written by {who}{when} (it holds {path.name}). Two runs in "
            "one folder would interleave their histories: give this run another run_dir, or "
            "wait for that one to end (a resume of it is fine once it has stopped)."
        ) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return RunLock(fd, path)


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The holder's ``{"pid", "host", "start_time"}`` while a live process holds the lock;
    None when nobody does (or there is no lock file, or no ``fcntl``)."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(path) or {"pid": None}
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

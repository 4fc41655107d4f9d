"""Errors in a user's model file, with only the user's frames of the traceback, and the
deadline that stops a forward pass running forever.

Used by :mod:`tdiag.loading` (re-exported there): every way a file can fail to load or run
becomes a :class:`LoadError` naming the cause in one paragraph; ``tdiag check`` turns it into
exit code 2.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from tdiag.findings import TdiagError

__all__ = [
    "DeadlineExceeded",
    "LoadError",
    "deadline",
    "fail",
    "parse_target",
    "user_traceback",
    "where_stuck",
    "where_stuck_in_dump",
]

logger = logging.getLogger(__name__)

#: The tdiag package: its frames are never shown as the user's.
_TDIAG_DIR = Path(__file__).resolve().parents[1]


class LoadError(TdiagError):
    """The model file could not be loaded or run.

    Attributes:
        cause: a short stable key: missing-file, not-python, syntax-error, import-error,
            no-factory, factory-raised, not-a-module, meta-device, to-device, no-vocab,
            batch-raised, bad-batch, forward-raised, bad-output, loss-raised, bad-loss,
            exit-called, timeout, bad-option (an invalid option, such as a ``--seq-len``
            longer than the model's positions); and, from the check process of ``tdiag check``:
            process-ended (``os._exit``), process-killed (a signal: a native crash, the
            out-of-memory killer), internal-error (a bug in tdiag).
        message: one paragraph naming the cause.
        user_traceback: the user's frames of the traceback ("" when none).
    """

    def __init__(self, message: str, *, cause: str, user_traceback: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.user_traceback = user_traceback

    def __str__(self) -> str:
        if self.user_traceback:
            return f"{self.message}\n\n{self.user_traceback.rstrip()}"
        return self.message


class DeadlineExceeded(BaseException):
    """Raised by :func:`deadline`'s SIGALRM handler inside the running code. A BaseException
    so that a user's ``except Exception`` inside a looping forward cannot swallow it.

    :func:`tdiag.debug.runner.run_checks` catches it to keep the finished checks' results;
    anywhere else it leaves the ``deadline`` block as ``LoadError(cause="timeout")``.

    Attributes:
        seconds: the deadline that was reached (``--timeout``).
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g} s")
        self.seconds = seconds


def parse_target(target: str) -> tuple[Path, str | None]:
    """Split ``PATH.py[:FACTORY]`` into the path and the factory name (or None)."""
    path, sep, factory = target.rpartition(":")
    if sep and factory.isidentifier() and path:
        return Path(path), factory
    return Path(target), None


# -- traceback filtering ---------------------------------------------------------------------


def _is_user_frame(filename: str, user_dir: Path) -> bool:
    try:
        p = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    parts = set(p.parts)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    if _TDIAG_DIR in p.parents:
        return False
    return user_dir in p.parents


def user_traceback(exc: BaseException, user_file: Path) -> str:
    """The frames of ``exc``'s traceback (and its causes) that lie in the user's folder,
    plus the exception line; "" when none."""
    user_dir = user_file.resolve().parent
    lines: list[str] = []
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if _is_user_frame(f.filename, user_dir)
    ]
    if frames:
        lines.append("Traceback (your code only):\n")
        lines.extend(traceback.format_list(frames))
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines).rstrip()


def fail(cause: str, message: str, exc: BaseException | None, user_file: Path) -> LoadError:
    """A LoadError with ``message`` and the user's frames of ``exc``'s traceback."""
    tb = user_traceback(exc, user_file) if exc is not None else ""
    return LoadError(message, cause=cause, user_traceback=tb)


# -- timeout ---------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(
    seconds: float | None,
    *,
    user_file: Path | None = None,
    what: Callable[[], str] = lambda: "running the checks",
) -> Iterator[None]:
    """Raise ``LoadError(cause="timeout")`` when the block runs longer than ``seconds``.

    The alarm raises :class:`DeadlineExceeded` where the code is running; code inside the
    block may catch it (the check runner does, to report the checks already finished) — then
    no LoadError is raised and the block ends normally.

    Uses SIGALRM in the main thread: it stops Python-level code (a forward that loops
    forever). Limitation: a single long native call (one huge matmul, a blocking CUDA
    kernel) is interrupted only when it returns to Python; outside the main thread or on
    platforms without SIGALRM no deadline is enforced (logged).
    """
    usable = (
        seconds is not None
        and seconds > 0
        and math.isfinite(seconds)
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        if seconds:
            logger.info("no timeout enforced (not the main thread, or no SIGALRM here)")
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    except DeadlineExceeded as exc:
        raise LoadError(
            f"stopped after {seconds:g} s (--timeout) while {what()}; a forward "
            "pass that never returns (an endless loop?) is the usual cause. A model that is "
            "only slow: raise --timeout, or --skip the slow check.",
            cause="timeout",
            user_traceback=where_stuck(exc, user_file),
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # an enclosing timer (pytest-timeout, the caller's): give it back
            remaining = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), outer_interval)


def where_stuck(exc: BaseException, user_file: Path | None) -> str:
    """The last user frames of ``exc``'s traceback (where a timed-out run was), or ""."""
    if user_file is None:
        return ""
    user_dir = user_file.resolve().parent
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if _is_user_frame(f.filename, user_dir) and f.name != "on_alarm"
    ]
    if not frames:
        return ""
    return "Where it was running (your code only):\n" + "".join(traceback.format_list(frames[-5:]))


#: A frame line of a :mod:`faulthandler` dump: ``  File "/x/model.py", line 12 in forward``.
_DUMP_FRAME = re.compile(r'^\s+File "(?P<file>.+)", line (?P<line>\d+) in (?P<name>.+)$')


def where_stuck_in_dump(dump: str, thread: int, user_file: Path) -> str:
    """The last user frames of thread ``thread`` in a :mod:`faulthandler` dump (written by
    the check process at its deadline, or when it crashed), formatted as :func:`where_stuck`
    does; "" when the dump has none.

    Args:
        dump: the text faulthandler wrote (threads, most recent call first).
        thread: the ident (``threading.get_ident()``) of the thread to read, the main one.
        user_file: the model file; frames in its folder (not tdiag's, not site-packages) count.
    """
    user_dir = user_file.resolve().parent
    header = re.compile(rf"^(Current thread|Thread) 0x0*{thread:x} ")
    frames: list[traceback.FrameSummary] = []
    inside = False
    for line in dump.splitlines():
        if line.startswith(("Current thread", "Thread ")):
            inside = bool(header.match(line))
            if inside:  # a later dump of the thread (a crash after the deadline's) replaces it
                frames = []
            continue
        m = _DUMP_FRAME.match(line) if inside else None
        if m and _is_user_frame(m["file"], user_dir):
            frames.append(traceback.FrameSummary(m["file"], int(m["line"]), m["name"]))
    if not frames:
        return ""
    frames.reverse()  # faulthandler: most recent call first; tracebacks: last
    return "Where it was running (your code only):\n" + "".join(traceback.format_list(frames[-5:]))

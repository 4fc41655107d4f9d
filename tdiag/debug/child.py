"""The child side of ``tdiag check``'s check process (see :mod:`tdiag.debug.worker`): it
imports torch and the checks, loads the file and runs the checks, and sends each event to
the parent as it happens.

Torch-free at import, as the parent imports it (for the process's entry point).
"""

from __future__ import annotations

import faulthandler
import io
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from tdiag.debug.usercode import LoadError, user_traceback

if TYPE_CHECKING:
    from tdiag.debug.worker import CheckJob

__all__ = ["child_main"]


class _Channel:
    """The child's end of the pipe; sends are whole messages, from any thread."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, *message: Any) -> None:
        with self._lock:
            self._conn.send(message)


class _Forward(io.TextIOBase):
    """The child's ``sys.stdout``/``sys.stderr``: what the file prints is sent to the parent,
    which writes it to its own streams (the terminal, or a test's capture)."""

    def __init__(self, channel: _Channel, stream: str, fd: int) -> None:
        super().__init__()
        self._channel, self._stream, self._fd = channel, stream, fd

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            self._channel.send("out", self._stream, text)
        return len(text)

    def fileno(self) -> int:
        return self._fd  # native writes go to the real descriptor


def child_main(conn: Connection, job: CheckJob, dump_path: str) -> None:
    """The child's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it kills the child
    channel = _Channel(conn)
    if job.json_out:
        os.dup2(2, 1)  # native writes to stdout too: the parent's stdout is the JSON object
    sys.stdout = _Forward(channel, "stderr" if job.json_out else "stdout", 1)
    sys.stderr = _Forward(channel, "stderr", 2)
    with open(dump_path, "w", encoding="utf-8") as dump:
        faulthandler.enable(file=dump)  # a native crash dumps the stacks too
        try:
            _check(job, channel, dump)
        except SystemExit as exc:  # sys.exit() in a check's call of the user's code
            channel.send("exited", repr(exc.code), user_traceback(exc, job.path))
        except BaseException as exc:  # at the process boundary: whatever escaped, reported
            channel.send("internal-error", "".join(traceback.format_exception(exc)).rstrip())
    # the parent has everything: skip the interpreter's teardown (~1 s with torch loaded), as
    # a forked child does anyway
    os._exit(0)


def _check(job: CheckJob, channel: _Channel, dump: io.TextIOWrapper) -> None:
    import random

    import torch

    from tdiag.debug.runner import _check_device, _cpu_threads, _meta, run_checks, select_checks
    from tdiag.loading import load_target

    try:
        device = _check_device(job.device)
        specs = select_checks(job.only, job.skip)
    except ValueError as exc:
        channel.send("bad-option", str(exc))
        return
    if job.deadline_s is not None:
        faulthandler.dump_traceback_later(job.deadline_s, file=dump)
    channel.send("ready", threading.get_ident())
    random.seed(job.seed)
    torch.manual_seed(job.seed)
    try:
        ctx = load_target(
            job.target,
            device=device,
            batch_size=job.batch_size,
            seq_len=job.seq_len,
            seed=job.seed,
            no_causal=job.no_causal,
            on_phase=lambda what: channel.send("phase", what),
        )
    except LoadError as exc:
        channel.send("load-error", exc.message, exc.cause, exc.user_traceback)
        return
    channel.send("loaded", _meta(ctx), [s.id for s in specs])
    with _cpu_threads(ctx):
        run = run_checks(
            ctx,
            job.only,
            job.skip,
            on_start=lambda spec, i, n: channel.send("start", spec.id, i, n),
            on_result=lambda result: channel.send("result", result),
        )
    channel.send("done", run.seconds)

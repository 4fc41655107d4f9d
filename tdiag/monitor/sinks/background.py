"""One background writer thread for the sinks that need not run on the training thread.

TensorBoard's protobuf encoding, the console's rendering and wandb's ``run.log`` cost
~50–150 µs each per log step: :class:`SinkWorker` moves them off the training thread,
which then pays one bounded-queue ``put`` (a few µs). The history (``JsonlSink``) stays on
the training thread: it is the source of truth, and written there it keeps its promise
that a crash loses at most the line in flight (docs/sinks.md, "Threads").

The worker runs the calls in the order they were made, one at a time, so each sink still
sees ``write``/``event``/``close`` in order and from one thread at a time. The queue is
bounded: when the sinks fall behind, the training thread waits (up to ``stall_s``) rather
than letting memory grow; a sink stuck for longer (a hung network mount) has its calls
dropped, counted and reported once, and training goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SinkWorker", "runs_in_background"]

logger = logging.getLogger(__name__)

_STOP = object()  # the last item: the worker exits after it


def runs_in_background(sink: object) -> bool:
    """May ``sink`` be called from the writer thread? Its ``background`` attribute says so
    (TensorBoard and wandb: True; the history: False); the console, which does not declare
    it, renders there too; any other sink stays on the caller's thread."""
    declared = getattr(sink, "background", None)
    if isinstance(declared, bool):
        return declared
    from tdiag.monitor.sinks.console import ConsoleSink

    return isinstance(sink, ConsoleSink)


class SinkWorker:
    """A daemon thread that runs queued calls in order.

    Args:
        run: called in the thread as ``run(phase, args)`` for each submitted call; it must
            not raise (the MultiSink isolates each sink's failures itself).
        maxsize: queue bound, in calls (a 50-metric row is ~5 KB: 4096 rows ~20 MB).
        stall_s: how long a submit waits on a full queue before the calls are dropped.

    Attributes:
        dropped: calls dropped because the sinks were stuck (0 in a healthy run).
    """

    def __init__(
        self,
        run: Callable[[str, tuple[Any, ...]], None],
        *,
        maxsize: int = 4096,
        stall_s: float = 2.0,
        name: str = "tdiag-sink-writer",
    ) -> None:
        self._run = run
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.stall_s = stall_s
        self.dropped = 0
        self._stalled = False
        self._stopping = False
        self._stop_queued = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, phase: str, args: tuple[Any, ...]) -> bool:
        """Queue one call; returns False when it was dropped (queue full past ``stall_s``,
        or the worker stopped)."""
        if self._stopping or not self._thread.is_alive():
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait((phase, args))
        except queue.Full:
            return self._submit_full(phase, args)
        self._stalled = False
        return True

    def _submit_full(self, phase: str, args: tuple[Any, ...]) -> bool:
        if not self._stalled:  # back-pressure: a slow sink slows the log step, bounded
            try:
                self._queue.put((phase, args), timeout=self.stall_s)
                return True
            except queue.Full:
                self._stalled = True
                logger.warning(
                    "tdiag: the background sinks (TensorBoard/console/wandb) made no progress "
                    "for %g s; their rows are dropped until they catch up. history.jsonl "
                    "keeps every row; training goes on.",
                    self.stall_s,
                )
        self.dropped += 1
        return False

    def submit_last(self, phase: str, args: tuple[Any, ...], timeout: float | None) -> bool:
        """Queue the final call (``close``), waiting up to ``timeout`` for room even when
        the worker was stalled; no call is accepted after it."""
        if self._stopping or not self._thread.is_alive():
            return False
        self._stopping = True
        try:
            self._queue.put((phase, args), timeout=timeout)
        except queue.Full:
            return False
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every call submitted so far has run. False on timeout."""
        if not self._thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._queue.put(("", (done,)), timeout=timeout)
        except queue.Full:
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return done.wait(left)

    def stop(self, timeout: float | None = None) -> bool:
        """Run what is queued, then end the thread. False when it did not end in time
        (a stuck sink: the daemon thread is left behind, the calls after it are lost)."""
        self._stopping = True  # no new calls from now on
        if not self._stop_queued:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return False
            self._stop_queued = True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Calls queued and not yet started (approximate)."""
        return self._queue.qsize()

    def _loop(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            phase, args = item
            if not phase:  # a flush marker
                args[0].set()
                continue
            try:
                self._run(phase, args)
            except Exception as exc:  # run() isolates sinks; this is a bug in tdiag itself
                logger.warning("tdiag: the background sink writer failed (%r); goes on", exc)

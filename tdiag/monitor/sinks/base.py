"""The Sink protocol, a no-op sink and a fan-out container that isolates failures.

A sink receives what the Monitor measured: ``open`` once, ``write`` once per log step
(and for each ``mon.log``), ``event`` for each live Finding, ``close`` once. The Monitor
always talks to one :class:`MultiSink`, so it never branches on "is logging on" and a
broken sink (disk full, wandb missing, a bug) never stops training.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tdiag.findings import Finding, TdiagError
from tdiag.monitor.sinks.background import SinkWorker, runs_in_background

__all__ = ["MultiSink", "NullSink", "Sink", "SinkFailure", "SinkUnavailable"]

logger = logging.getLogger(__name__)


class SinkUnavailable(TdiagError):
    """A sink cannot work in this environment (e.g. its optional package is missing).

    Raised from ``open`` with a message that says what to install or set; :class:`MultiSink`
    logs the message (without a traceback) and disables the sink.
    """


@runtime_checkable
class Sink(Protocol):
    """Where metrics and live Findings go. Duck-typed: any object with these methods."""

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        """Called once before the first write. ``meta`` is the run's meta.json content."""

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """One row of metrics at ``step`` (floats; non-finite values allowed)."""

    def event(self, finding: Finding) -> None:
        """A Finding raised during training (e.g. a non-finite loss)."""

    def close(self) -> None:
        """Flush and release resources. Called once; must tolerate a failed ``open``."""


class NullSink:
    """A sink that does nothing (the default when a backend is switched off)."""

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        pass

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def event(self, finding: Finding) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SinkFailure:
    """Why a sink was disabled: which sink, in which call, and the error."""

    sink: str
    phase: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"sink": self.sink, "phase": self.phase, "error": self.error}


def _sink_name(sink: object) -> str:
    return type(sink).__name__


class MultiSink:
    """Fan calls out to several sinks; a sink that raises is logged once and disabled.

    Any ``Exception`` from a sink (``OSError`` on a full disk, ``ImportError``, a bug) is
    caught, logged once as a warning naming the sink and the error, and that sink gets no
    further ``write``/``event`` calls; the others go on. ``KeyboardInterrupt`` and
    ``SystemExit`` are not caught. A disabled sink still gets one best-effort ``close`` so
    it can release files and threads.

    With ``background=True`` the sinks that may run off the caller's thread
    (:func:`~tdiag.monitor.sinks.background.runs_in_background`: TensorBoard, the console,
    wandb) get their ``write``/``event``/``close`` calls through one writer thread fed by a
    bounded queue (:class:`~tdiag.monitor.sinks.background.SinkWorker`), in order; the
    others (the history) are called at once. ``open`` always runs on the caller's thread.
    ``close`` (also run at interpreter exit if it was not called) drains the queue first.

    Args:
        sinks: the sinks, called in this order (``None`` entries are skipped).
        background: move the sinks that allow it to the writer thread.
        drain_timeout_s: how long ``close`` waits for the writer thread to finish the
            queued calls (a stuck sink cannot hold the exit longer).

    Attributes:
        failures: one :class:`SinkFailure` per disabled sink, in the order they failed
            (the Monitor may put them in meta.json or raise a Finding).
    """

    def __init__(
        self,
        sinks: Iterable[Sink | None] = (),
        *,
        background: bool = False,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self.sinks: list[Sink] = [s for s in sinks if s is not None]
        self._disabled: set[int] = set()
        self._closed = False
        self.failures: list[SinkFailure] = []
        self.background = background
        self.drain_timeout_s = drain_timeout_s
        self._worker: SinkWorker | None = None
        self._later: list[int] = []  # indices of the sinks called from the writer thread
        self._now: list[int] = list(range(len(self.sinks)))  # ... and on the caller's thread

    @property
    def active(self) -> list[Sink]:
        """The sinks still enabled."""
        return [s for i, s in enumerate(self.sinks) if i not in self._disabled]

    def add(self, sink: Sink) -> None:
        """Append a sink (before ``open``)."""
        self.sinks.append(sink)
        self._now.append(len(self.sinks) - 1)

    def _fail(self, index: int, phase: str, exc: Exception) -> None:
        sink = self.sinks[index]
        self._disabled.add(index)
        name = _sink_name(sink)
        if isinstance(exc, SinkUnavailable):
            error = str(exc)
        else:
            error = f"{type(exc).__name__}: {exc}"
        self.failures.append(SinkFailure(sink=name, phase=phase, error=error))
        logger.warning(
            "tdiag: the %s sink failed in %s() (%s); it is disabled, training and the other "
            "sinks go on.",
            name,
            phase,
            error,
        )
        # The traceback helps whoever debugs the sink, not the person training.
        logger.debug("traceback of the %s sink failure", name, exc_info=exc)

    def _call(self, phase: str, *args: Any, only: Iterable[int] | None = None) -> None:
        for i in range(len(self.sinks)) if only is None else only:
            if i in self._disabled:
                continue
            try:
                getattr(self.sinks[i], phase)(*args)
            except Exception as exc:  # isolate: a monitoring failure never stops training
                self._fail(i, phase, exc)

    def _dispatch(self, phase: str, *args: Any) -> None:
        self._call(phase, *args, only=self._now)
        if self._worker is not None:
            self._worker.submit(phase, args)

    def _run_later(self, phase: str, args: tuple[Any, ...]) -> None:
        """In the writer thread: one queued call, to the background sinks."""
        if phase == "close":
            self._close_sinks(self._later)
        else:
            self._call(phase, *args, only=self._later)

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        self._call("open", Path(run_dir), meta)
        if self.background and self._worker is None:
            later = [i for i in self._now if runs_in_background(self.sinks[i])]
            if any(i not in self._disabled for i in later):
                self._later = later
                self._now = [i for i in self._now if i not in later]
                self._worker = SinkWorker(self._run_later)
                atexit.register(self._close_at_exit)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        # A copy for the writer thread: the caller may reuse or change its dict.
        self._dispatch("write", step, dict(metrics) if self._worker is not None else metrics)

    def event(self, finding: Finding) -> None:
        self._dispatch("event", finding)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the writer thread has run every call made so far (at once without
        one). False on timeout."""
        return True if self._worker is None else self._worker.flush(timeout)

    @property
    def dropped(self) -> int:
        """Calls to the background sinks dropped because they were stuck (normally 0)."""
        return 0 if self._worker is None else self._worker.dropped

    def close(self, timeout: float | None = None) -> None:
        """Close every sink once (disabled ones best-effort, errors only logged at debug).

        The background sinks are closed in the writer thread after their queued calls;
        ``close`` waits for that up to ``timeout`` (default ``drain_timeout_s``), then logs
        what was left and returns: a stuck sink never holds the exit.
        """
        if self._closed:
            return
        self._closed = True
        self._close_sinks(self._now)
        worker, self._worker = self._worker, None
        if worker is None:
            return
        atexit.unregister(self._close_at_exit)
        wait = self.drain_timeout_s if timeout is None else timeout
        t0 = time.monotonic()
        worker.submit_last("close", (), wait)
        if not worker.stop(max(0.0, wait - (time.monotonic() - t0))):
            logger.warning(
                "tdiag: the background sinks did not finish within %.1f s (%d call(s) still "
                "queued); TensorBoard/console/wandb may miss the last rows. history.jsonl has "
                "them all.",
                wait,
                worker.pending,
            )
        elif worker.dropped:
            logger.warning(
                "tdiag: %d call(s) to the background sinks were dropped while they were stuck; "
                "history.jsonl has every row.",
                worker.dropped,
            )

    def _close_sinks(self, indices: Iterable[int]) -> None:
        for i in indices:
            sink = self.sinks[i]
            if i in self._disabled:
                try:
                    sink.close()
                except Exception as exc:  # already reported once; just release what we can
                    logger.debug("closing the disabled %s sink failed: %r", _sink_name(sink), exc)
                continue
            try:
                sink.close()
            except Exception as exc:
                self._fail(i, "close", exc)

    def _close_at_exit(self) -> None:
        """At interpreter exit, for a MultiSink never closed: flush what is queued (the
        writer thread is a daemon; it would be stopped mid-queue)."""
        self.close(timeout=min(self.drain_timeout_s, 5.0))

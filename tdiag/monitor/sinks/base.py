"""The Sink protocol, a no-op sink and a fan-out container that isolates failures.

A sink receives what the Monitor measured: ``open`` once, ``write`` once per log step
(and for each ``mon.log``), ``event`` for each live Finding, ``close`` once. The Monitor
always talks to one :class:`MultiSink`, so it never branches on "is logging on" and a
broken sink (disk full, wandb missing, a bug) never stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tdiag.findings import Finding, TdiagError

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

    Args:
        sinks: the sinks, called in this order (``None`` entries are skipped).

    Attributes:
        failures: one :class:`SinkFailure` per disabled sink, in the order they failed
            (the Monitor may put them in meta.json or raise a Finding).
    """

    def __init__(self, sinks: Iterable[Sink | None] = ()) -> None:
        self.sinks: list[Sink] = [s for s in sinks if s is not None]
        self._disabled: set[int] = set()
        self._closed = False
        self.failures: list[SinkFailure] = []

    @property
    def active(self) -> list[Sink]:
        """The sinks still enabled."""
        return [s for i, s in enumerate(self.sinks) if i not in self._disabled]

    def add(self, sink: Sink) -> None:
        """Append a sink (before ``open``)."""
        self.sinks.append(sink)

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

    def _call(self, phase: str, *args: Any) -> None:
        for i, sink in enumerate(self.sinks):
            if i in self._disabled:
                continue
            try:
                getattr(sink, phase)(*args)
            except Exception as exc:  # isolate: a monitoring failure never stops training
                self._fail(i, phase, exc)

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        self._call("open", Path(run_dir), meta)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._call("write", step, metrics)

    def event(self, finding: Finding) -> None:
        self._call("event", finding)

    def close(self) -> None:
        """Close every sink once (disabled ones best-effort, errors only logged at debug)."""
        if self._closed:
            return
        self._closed = True
        for i, sink in enumerate(self.sinks):
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

"""The history sink: ``RUN_DIR/history.jsonl`` and ``RUN_DIR/events.jsonl`` (Contract 3).

The history is the one source of truth the report reads, so every row is strict JSON
(non-finite floats as the strings "NaN"/"Infinity"/"-Infinity"), written append-only and
flushed per line: a reader can follow the file while training writes it, and a crash
loses at most the line in flight. ``meta.json`` is not written here: the Monitor owns it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from tdiag.findings import Finding
from tdiag.history import EVENTS_FILE, HISTORY_FILE, HistoryWriter, ends_torn

__all__ = ["JsonlSink"]


class JsonlSink:
    """Write metric rows to history.jsonl and live Findings to events.jsonl.

    Rows are ``{"step": int, "time": unix seconds, **metrics}``. Both files are appended to
    if they exist (a resumed run continues its history; the reader keeps the later rows).

    Args:
        fsync: also ``os.fsync`` each history line (survives power loss; one syscall per log step).
        clock: wall-clock source for the ``time`` field (tests inject a fixed one).
    """

    # Called on the training thread, never from the background writer: a row is on disk
    # when write() returns, so a crash loses at most the line in flight (docs/sinks.md).
    background = False

    def __init__(self, *, fsync: bool = False, clock: Callable[[], float] = time.time) -> None:
        self._fsync = fsync
        self._clock = clock
        self._history: HistoryWriter | None = None
        self._events: IO[str] | None = None
        self._events_lead = ""
        self.run_dir: Path | None = None

    def open(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._history = HistoryWriter(self.run_dir / HISTORY_FILE, fsync=self._fsync)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._history is None:
            raise RuntimeError("JsonlSink.write() before open()")
        row: dict[str, Any] = {"step": int(step), "time": self._clock()}
        row.update((k, v) for k, v in metrics.items() if k != "step")  # the step is the argument
        self._history.write(row)

    def event(self, finding: Finding) -> None:
        if self.run_dir is None:
            raise RuntimeError("JsonlSink.event() before open()")
        if self._events is None:  # created on the first Finding: no empty file for clean runs
            path = self.run_dir / EVENTS_FILE
            # After a torn last line (a crash, a full disk) the first new line starts on a
            # line of its own: the fragment costs only itself, as in the history.
            self._events_lead = "\n" if ends_torn(path) else ""
            self._events = open(path, "a", encoding="utf-8")  # noqa: SIM115
        line = json.dumps(finding.to_dict(), allow_nan=False)
        self._events.write(self._events_lead + line + "\n")  # one write, newline included
        self._events.flush()
        self._events_lead = ""

    def close(self) -> None:
        if self._history is not None:
            self._history.close()
            self._history = None
        if self._events is not None:
            self._events.close()
            self._events = None

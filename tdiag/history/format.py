"""The history's file names, format version and errors (shared by the writer and reader)."""

from __future__ import annotations

import os

from tdiag.findings import TdiagError

__all__ = [
    "DROPPED_ATTR",
    "EVENTS_FILE",
    "HISTORY_FILE",
    "HISTORY_SCHEMA",
    "META_FILE",
    "SCHEMA_KEY",
    "HistoryReadError",
    "HistorySchemaError",
]

HISTORY_FILE = "history.jsonl"
META_FILE = "meta.json"
EVENTS_FILE = "events.jsonl"

HISTORY_SCHEMA = 1
"""The history format this tdiag writes, and the newest it reads."""
SCHEMA_KEY = "tdiag_history"
"""Reserved key of the format version, on the first row of each writer; never a column."""
DROPPED_ATTR = "tdiag_dropped_rows"
"""``DataFrame.attrs`` key of the frame :func:`read_history` returns, present when values
were dropped: ``{column: (row label, …)}``, the cells that read as NaN because the file
held no number there (``ReadStats.dropped_rows``), so that no consumer takes them for a
logged NaN. Labels of the frame's index: a filtered frame keeps them."""


class HistoryReadError(TdiagError):
    """Nothing usable could be read from a history file or run folder."""


class HistorySchemaError(HistoryReadError):
    """The history was written in a newer format than this tdiag reads.

    Attributes:
        found: the format version in the file.
        supported: the newest version this tdiag reads (:data:`HISTORY_SCHEMA`).
    """

    def __init__(self, path: str | os.PathLike[str], found: int) -> None:
        from tdiag import __version__

        self.found, self.supported = found, HISTORY_SCHEMA
        shown = str(found) if len(str(found)) <= 12 else f"{str(found)[:12]}…"
        super().__init__(
            f"{path} is in tdiag history format {shown}, written by a newer tdiag; "
            f"this tdiag ({__version__}) reads formats up to {HISTORY_SCHEMA}: upgrade tdiag"
        )

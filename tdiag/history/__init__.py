"""The metric history (Contract 3): write it append-only, read it back tolerantly.

``RUN_DIR/history.jsonl`` holds one flat JSON object per line. Non-finite floats are
written as the strings "NaN", "Infinity", "-Infinity" so that every line is strict JSON.
The first row each :class:`HistoryWriter` writes also carries ``"tdiag_history": N``, the
format version (:data:`HISTORY_SCHEMA`): it travels with the file (a history alone is
enough for a report) and every resumed segment states its own. Files without it are
format 1 too (written before the marker existed).

The reader is total: whatever bytes the file holds, it returns a frame and a
:class:`ReadStats` that counts and states what it skipped, or raises
:class:`HistoryReadError` (nothing else). Each line is judged on its own; only the bytes
present when the file was opened are read, so a report on a live run neither chases the
writer nor mistakes the line in flight for mid-file garbage.
"""

from tdiag.history.events import read_events
from tdiag.history.format import (
    DROPPED_ATTR,
    EVENTS_FILE,
    HISTORY_FILE,
    HISTORY_SCHEMA,
    META_FILE,
    SCHEMA_KEY,
    HistoryReadError,
    HistorySchemaError,
)
from tdiag.history.reader import read_history
from tdiag.history.stats import ReadStats
from tdiag.history.writer import HistoryWriter, ends_torn, write_json_atomic, write_text_atomic

__all__ = [
    "DROPPED_ATTR",
    "EVENTS_FILE",
    "HISTORY_FILE",
    "HISTORY_SCHEMA",
    "META_FILE",
    "SCHEMA_KEY",
    "HistoryReadError",
    "HistorySchemaError",
    "HistoryWriter",
    "ReadStats",
    "ends_torn",
    "read_events",
    "read_history",
    "write_json_atomic",
    "write_text_atomic",
]

"""The flight recorder: the last N steps' metrics, written out when something goes wrong.

The Monitor appends one row per training step (loss, gradient norm when known, host step
and data time) once the log step has brought the interval's values to the host, plus each
logged row. On a non-finite loss/gradient, or an exception leaving the Monitor's ``with``
block, :meth:`FlightRecorder.dump` writes ``RUN_DIR/flight_recorder.jsonl`` atomically:
a first line ``{"flight_recorder": {"reason", "step", "time", "detail"}}``, then the rows,
oldest first, each ``{"step": int, ...metrics}`` in history.jsonl's strict-JSON encoding.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdiag.findings import to_jsonable
from tdiag.history import write_text_atomic

__all__ = ["FLIGHT_RECORDER_FILE", "FlightRecorder"]

FLIGHT_RECORDER_FILE = "flight_recorder.jsonl"


class FlightRecorder:
    """A ring buffer of the last ``capacity`` step rows.

    Args:
        capacity: rows kept (0 disables the recorder).
    """

    def __init__(self, capacity: int = 200) -> None:
        if capacity < 0:
            raise ValueError(f"flight_recorder capacity must be >= 0, got {capacity!r}")
        self.capacity = capacity
        self._rows: deque[dict[str, Any]] = deque(maxlen=max(capacity, 1))
        self.dumps = 0

    def __len__(self) -> int:
        return len(self._rows) if self.capacity else 0

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Add (or merge into the last row, if it is the same step) one step's values."""
        if not self.capacity:
            return
        if self._rows and self._rows[-1].get("step") == step:
            self._rows[-1].update(metrics)
        else:
            self._rows.append({"step": int(step), **metrics})

    def rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows] if self.capacity else []

    def dump(
        self, run_dir: str | Path, *, reason: str, step: int | None, detail: str = ""
    ) -> Path | None:
        """Write the buffer to ``run_dir/flight_recorder.jsonl`` (atomic). Returns the path."""
        if not self.capacity:
            return None
        header = {
            "flight_recorder": {
                "reason": reason,
                "step": step,
                "time": time.time(),
                "detail": detail,
                "rows": len(self._rows),
            }
        }
        lines = [json.dumps(to_jsonable(header), allow_nan=False)]
        lines += [
            json.dumps(to_jsonable(r), allow_nan=False, separators=(",", ":")) for r in self._rows
        ]
        path = Path(run_dir) / FLIGHT_RECORDER_FILE
        write_text_atomic(path, "\n".join(lines) + "\n")
        self.dumps += 1
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "rows": self.rows()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rows.clear()
        for row in state.get("rows", []):
            self._rows.append(dict(row))

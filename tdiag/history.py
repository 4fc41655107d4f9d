"""The metric history (Contract 3): write it append-only, read it back tolerantly.

``RUN_DIR/history.jsonl`` holds one flat JSON object per line. Non-finite floats are
written as the strings "NaN", "Infinity", "-Infinity" so that every line is strict JSON.
The reader maps them back, also accepts the bare NaN/Infinity tokens Python's json
writes, skips (and counts) torn or garbage lines, and tolerates sparse rows.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from tdiag.findings import TdiagError, to_jsonable

__all__ = [
    "HISTORY_FILE",
    "HistoryReadError",
    "HistoryWriter",
    "ReadStats",
    "read_events",
    "read_history",
    "write_json_atomic",
    "write_text_atomic",
]

HISTORY_FILE = "history.jsonl"
META_FILE = "meta.json"
EVENTS_FILE = "events.jsonl"

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class HistoryReadError(TdiagError):
    """Nothing usable could be read from a history file or run folder."""


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename:
    a reader never sees a half-written file and a crash leaves the old one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as strict JSON (non-finite floats encoded as strings)."""
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n")


class HistoryWriter:
    """Append rows to a history.jsonl, one strict-JSON line per row, flushed per line.

    Args:
        path: the file (created with its folder; appended to if it exists, e.g. on resume).
        fsync: also ``os.fsync`` after each line (survives power loss, costs a syscall).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row. Raises ValueError if the row has no integer ``step``."""
        if self._fh is None:
            raise ValueError(f"history writer for {self.path} is closed")
        if "step" not in row:
            raise ValueError(f"a history row needs a 'step', got keys {sorted(row)!r}")
        line = json.dumps(to_jsonable(dict(row)), allow_nan=False, separators=(",", ":"))
        self._fh.write(line + "\n")
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ReadStats:
    """What the tolerant reader saw. ``problems`` lists human-readable sentences."""

    lines: int = 0
    rows: int = 0
    blank: int = 0
    garbage: int = 0
    torn_last_line: bool = False
    no_step: int = 0
    non_monotonic: int = 0
    nonfinite_values: int = 0
    garbage_line_numbers: list[int] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.torn_last_line:
            out.append("the last line was cut off (torn write) and was skipped")
        n_bad = self.garbage - (1 if self.torn_last_line else 0)
        if n_bad > 0:
            first = ", ".join(str(n) for n in self.garbage_line_numbers[:5])
            out.append(f"{n_bad} line(s) were not valid JSON objects and were skipped (lines {first}…)")
        if self.no_step:
            out.append(f"{self.no_step} row(s) had no numeric 'step' and were skipped")
        if self.non_monotonic:
            out.append(
                f"step went backwards {self.non_monotonic} time(s) (a resumed run?); "
                "the later rows were kept"
            )
        if self.nonfinite_values:
            out.append(f"{self.nonfinite_values} non-finite value(s) (NaN/Inf)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "rows": self.rows,
            "blank": self.blank,
            "garbage": self.garbage,
            "torn_last_line": self.torn_last_line,
            "no_step": self.no_step,
            "non_monotonic": self.non_monotonic,
            "nonfinite_values": self.nonfinite_values,
            "problems": self.problems,
        }


def _parse_constant(token: str) -> float:
    return _NONFINITE[token]


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        if value in _NONFINITE:
            return _NONFINITE[value]
    return None


def read_history(
    path: str | os.PathLike[str], *, dedupe_resumed: bool = True
) -> tuple[pd.DataFrame, ReadStats]:
    """Read a history.jsonl (or a run folder containing one) into a DataFrame.

    Columns: ``step`` (int), ``time`` if present, then one float column per metric
    (NaN where a row did not carry it; non-numeric values are kept as object columns).
    Rows stay in file order; with ``dedupe_resumed`` a step logged again after a resume
    keeps its latest row (the resumed run's values win).

    Raises:
        HistoryReadError: the file is missing, unreadable, or holds no readable row.
    """
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        raise HistoryReadError(f"no history file at {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HistoryReadError(f"cannot read {path}: {exc}") from exc

    stats = ReadStats()
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    ends_with_newline = text.endswith("\n")
    if ends_with_newline:
        lines.pop()
    numeric: dict[str, tuple[array, array]] = {}
    other: dict[str, dict[int, Any]] = {}
    steps = array("q")
    last_step: int | None = None
    loads = json.JSONDecoder(parse_constant=_parse_constant).decode
    n_lines = len(lines)
    for lineno, line in enumerate(lines, start=1):
        stats.lines += 1
        if not line.strip():
            stats.blank += 1
            continue
        try:
            obj = loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            stats.garbage += 1
            if len(stats.garbage_line_numbers) < 20:
                stats.garbage_line_numbers.append(lineno)
            if lineno == n_lines and not ends_with_newline:
                stats.torn_last_line = True
            continue
        step = _to_float(obj.get("step"))
        if step is None or not math.isfinite(step):
            stats.no_step += 1
            continue
        step_i = int(step)
        if last_step is not None and step_i < last_step:
            stats.non_monotonic += 1
        last_step = step_i
        row = len(steps)
        steps.append(step_i)
        for key, value in obj.items():
            if key == "step":
                continue
            f = _to_float(value)
            if f is not None:
                col = numeric.get(key)
                if col is None:
                    col = numeric[key] = (array("q"), array("d"))
                col[0].append(row)
                col[1].append(f)
                if not math.isfinite(f):
                    stats.nonfinite_values += 1
            else:
                other.setdefault(key, {})[row] = value
    stats.rows = len(steps)
    if stats.rows == 0:
        raise HistoryReadError(
            f"{path} holds no readable row ({stats.lines} line(s), {stats.garbage} not JSON, "
            f"{stats.no_step} without a step)"
        )
    n = stats.rows
    data: dict[str, Any] = {"step": np.frombuffer(steps, dtype=np.int64).copy()}
    for key, (idx, vals) in numeric.items():
        if key in other:  # mixed column: keep everything as objects
            col_obj = np.full(n, None, dtype=object)
            col_obj[np.frombuffer(idx, dtype=np.int64)] = np.frombuffer(vals, dtype=np.float64)
            for r, v in other.pop(key).items():
                col_obj[r] = v
            data[key] = col_obj
            continue
        col = np.full(n, np.nan)
        col[np.frombuffer(idx, dtype=np.int64)] = np.frombuffer(vals, dtype=np.float64)
        data[key] = col
    for key, values in other.items():
        col_obj = np.full(n, None, dtype=object)
        for r, v in values.items():
            col_obj[r] = v
        data[key] = col_obj
    df = pd.DataFrame(data)
    if dedupe_resumed and stats.non_monotonic:
        # A resumed run logs some steps again; keep the last row written for each
        # (step, set-of-columns) by merging rows per step with later values winning.
        df = df.groupby("step", sort=True).last().reset_index()
    return df, stats


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read events.jsonl (Findings raised live). Garbage lines are skipped; missing file -> []."""
    from tdiag.findings import from_jsonable

    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line, parse_constant=_parse_constant)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(from_jsonable(obj))
    return out

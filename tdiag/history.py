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
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; reports and meta are meant to be shared
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
    superseded: int = 0
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
            out.append(
                f"{n_bad} line(s) were not valid JSON objects and were skipped (lines {first}…)"
            )
        if self.no_step:
            out.append(f"{self.no_step} row(s) had no numeric 'step' and were skipped")
        if self.non_monotonic:
            out.append(
                f"step went backwards {self.non_monotonic} time(s) (a resumed run?): "
                f"the {self.superseded} earlier row(s) of the replayed steps were dropped"
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
            "superseded": self.superseded,
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
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return None


def read_history(
    path: str | os.PathLike[str], *, dedupe_resumed: bool = True
) -> tuple[pd.DataFrame, ReadStats]:
    """Read a history.jsonl (or a run folder containing one) into a DataFrame.

    Columns: ``step`` (int), then one float column per metric in order of first appearance
    (NaN where a row did not carry it; non-numeric values are kept as object columns).
    Rows stay in file order; with ``dedupe_resumed``, when the step goes backwards (a run
    resumed from a checkpoint replays steps), the earlier rows of the replayed steps are
    dropped: the resumed run's rows win, whole (a NaN it logged is not back-filled).

    The file is read in blocks of lines, each parsed with one ``json`` call and turned into
    columns by pandas, so memory stays near the size of the resulting frame and the cost is
    linear in rows (about 1M rows x 20 metrics in ~10 s on one core); a block with a bad
    line falls back to line-by-line parsing to count and skip it.

    Raises:
        HistoryReadError: the file is missing, unreadable, or holds no readable row.
    """
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        raise HistoryReadError(f"no history file at {path}")
    stats = ReadStats()
    frames: list[pd.DataFrame] = []
    try:
        with open(path, "rb") as fh:
            lineno = 0
            while True:
                block = fh.readlines(_BLOCK_BYTES)
                if not block:
                    break
                records = _parse_block(block, lineno, stats)
                lineno += len(block)
                if records:
                    frames.append(_block_frame(records, stats))
    except OSError as exc:
        raise HistoryReadError(f"cannot read {path}: {exc}") from exc
    frames = [f for f in frames if len(f)]
    stats.rows = sum(len(f) for f in frames)
    if stats.rows == 0:
        raise HistoryReadError(
            f"{path} holds no readable row ({stats.lines} line(s), {stats.garbage} not JSON, "
            f"{stats.no_step} without a step)"
        )
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True, sort=False)
    df = _finish_columns(df)
    steps = df["step"].to_numpy()
    stats.non_monotonic = int(np.count_nonzero(steps[1:] < steps[:-1]))
    if dedupe_resumed and stats.non_monotonic:
        df = df.loc[~_superseded(steps)].reset_index(drop=True)
        stats.superseded = int(len(steps) - len(df))
    return df, stats


def _superseded(steps: np.ndarray) -> np.ndarray:
    """Rows that a resumed run wrote again: a row is superseded when a LATER segment (the
    file restarts a segment each time the step goes backwards) starts at or before its step.
    Rows of the same step in one segment (a val/loss row beside the train row) all stay."""
    segment = np.concatenate([[0], np.cumsum(steps[1:] < steps[:-1])])
    n_seg = int(segment[-1]) + 1
    seg_min = np.full(n_seg, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(seg_min, segment, steps)
    # later_min[g] = min step of all segments after g
    later_min = np.minimum.accumulate(seg_min[::-1])[::-1]
    later_min = np.concatenate([later_min[1:], [np.iinfo(np.int64).max]])
    return steps >= later_min[segment]


_BLOCK_BYTES = 1 << 24  # lines read and parsed per block (~16 MiB of text)


class _ConstantCounter:
    """``parse_constant`` hook that maps bare NaN/Infinity tokens and counts them."""

    def __init__(self, stats: ReadStats) -> None:
        self.stats = stats

    def __call__(self, token: str) -> float:
        self.stats.nonfinite_values += 1
        return _NONFINITE[token]


def _parse_block(block: list[bytes], first_lineno: int, stats: ReadStats) -> list[dict[str, Any]]:
    """The JSON objects of a block of lines; counts blank, garbage and torn lines in ``stats``."""
    stats.lines += len(block)
    decoder = json.JSONDecoder(parse_constant=_ConstantCounter(stats))
    lines = [line for line in block if line.strip()]
    stats.blank += len(block) - len(lines)
    torn_possible = not block[-1].endswith(b"\n")
    if lines and not (torn_possible and block[-1] is lines[-1]):
        # Fast path: the whole block in one parse. Any bad line -> redo line by line.
        saved = stats.nonfinite_values
        try:
            objs = decoder.decode("[" + b",".join(lines).decode("utf-8") + "]")
        except ValueError:
            objs = None
        if objs is not None and all(type(o) is dict for o in objs):
            return objs
        stats.nonfinite_values = saved
    records: list[dict[str, Any]] = []
    last = len(block) - 1
    for i, line in enumerate(block):
        if not line.strip():
            continue
        try:
            obj = decoder.decode(line.decode("utf-8", errors="replace"))
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            records.append(obj)
            continue
        stats.garbage += 1
        if len(stats.garbage_line_numbers) < 20:
            stats.garbage_line_numbers.append(first_lineno + i + 1)
        if i == last and torn_possible:
            stats.torn_last_line = True
    return records


def _block_frame(records: list[dict[str, Any]], stats: ReadStats) -> pd.DataFrame:
    """Columns of a block of rows: rows without a finite numeric step are dropped and counted;
    "NaN"/"Infinity" strings become floats (and are counted)."""
    df = pd.DataFrame.from_records(records)
    if "step" not in df.columns:
        stats.no_step += len(df)
        return df.iloc[0:0]
    step = _numeric(df["step"], stats, count=False)
    if step.dtype != np.float64:  # strings or other junk in "step": not a step
        step = pd.Series([_to_float(v) for v in step], index=step.index, dtype=np.float64)
    ok = np.isfinite(step.to_numpy())
    if not ok.all():
        stats.no_step += int((~ok).sum())
        df = df.loc[ok].reset_index(drop=True)
        step = step.loc[ok].reset_index(drop=True)
    df["step"] = step.astype(np.int64)
    for key in df.columns:
        if key != "step":
            df[key] = _numeric(df[key], stats, count=True)
    return df


def _is_number(v: Any) -> bool:
    return v is None or isinstance(v, int | float)  # bool is an int: read as 0.0/1.0


def _numeric(col: pd.Series, stats: ReadStats, *, count: bool) -> pd.Series:
    """A column as float64 when every value is a number, missing, or a non-finite string;
    otherwise an object column (with those strings mapped to floats)."""
    if col.dtype.kind in "fiub":
        return col.astype(np.float64)
    values = col.to_numpy(dtype=object)
    special = np.fromiter((type(v) is str and v in _NONFINITE for v in values), bool, len(values))
    if special.any():
        values = values.copy()
        values[special] = [_NONFINITE[v] for v in values[special]]
        if count:
            stats.nonfinite_values += int(special.sum())
    if all(_is_number(v) for v in values):
        return pd.Series(
            np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64),
            index=col.index,
        )
    return pd.Series(values, index=col.index, dtype=object)


def _finish_columns(df: pd.DataFrame) -> pd.DataFrame:
    """After concatenating blocks: ``step`` first; a column that is all numbers is float64
    (blocks disagree when one block had a non-number in it and another did not)."""
    for key in df.columns:
        col = df[key]
        if key != "step" and col.dtype == object:
            values = col.to_numpy()
            if all(_is_number(v) or (isinstance(v, float) and math.isnan(v)) for v in values):
                df[key] = np.array(
                    [np.nan if v is None else float(v) for v in values], dtype=np.float64
                )
    cols = ["step", *[c for c in df.columns if c != "step"]]
    return df[cols]


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

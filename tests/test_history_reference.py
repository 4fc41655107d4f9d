"""A line-by-line reference of the history reader (Contract 3) in plain Python: the
specification that ``tdiag.history.read_history`` must match on any bytes. The fuzz, cut
and bit-flip tests compare the reader with it. Slow on purpose: no blocks, no pandas,
each line parsed alone with ``json.loads``.

The rules it encodes:
- a line is what lies between two newlines; the bytes after the last newline are the
  last line, "torn" when they give no row;
- a row is a line that is valid UTF-8 (a byte-order mark allowed on line 1) and holds
  exactly one JSON object, blank lines being only " \\t\\r\\v\\f"; anything else is
  garbage (counted; "not UTF-8" counted apart, except for the torn last line);
- a row's ``step`` must be a finite number below 2**63 in size ("NaN" strings and bare
  tokens are not): it is truncated to an int; rows without one are counted and skipped;
- ``tdiag_history`` is the format marker (an int >= 1; a newer one than the reader's
  makes it raise, others are counted as unreadable), never a column;
- a value is a number (bool as 0/1, integers within float range), a NaN/Infinity token
  (string or bare, counted), null (a missing cell), or a non-number (dropped, counted);
- a metric name that is not valid Unicode (a lone surrogate) is dropped, counted once;
- columns: the keys of rows with a step, in order of first appearance, that received at
  least one number or token;
- resumed runs: a row is superseded when a later segment (segments restart where the
  step goes backwards) holds a step at or below its own.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tdiag.history import HISTORY_SCHEMA, SCHEMA_KEY

NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
BLANK = " \t\r\x0b\x0c"


@dataclass
class Reference:
    steps: list[int] = field(default_factory=list)
    cells: list[dict[str, float]] = field(default_factory=list)
    dropped: list[set[str]] = field(default_factory=list)  # per row: keys whose value was dropped
    columns: list[str] = field(default_factory=list)
    counts: dict[str, object] = field(default_factory=dict)
    garbage_line_numbers: list[int] = field(default_factory=list)
    invalid_utf8_line_numbers: list[int] = field(default_factory=list)
    non_numeric_keys: dict[str, int] = field(default_factory=dict)
    newer: int | None = None

    def frame(self) -> pd.DataFrame:
        """The frame the reader must return (step int64, metrics float64)."""
        data = {"step": np.array(self.steps, dtype=np.int64)}
        for key in self.columns:
            data[key] = np.array([row.get(key, np.nan) for row in self.cells], dtype=float)
        return pd.DataFrame(data)

    def dropped_rows(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, keys in enumerate(self.dropped):
            for key in sorted(keys):
                out.setdefault(key, []).append(i)
        return out


def _number(v: object) -> float | None:
    """A JSON value as a float, or None when it is not a number (or beyond float range)."""
    if type(v) is float:
        return v
    if type(v) in (int, bool):
        try:
            return float(v)
        except OverflowError:
            return None
    return None


def _encodable(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _objects(data: bytes, ref: Reference, c: dict[str, object]) -> list[dict]:
    """The JSON objects of the lines of ``data``, each line judged alone; counts in ``c``."""
    parts = data.split(b"\n")
    tail = parts.pop()
    items = [(raw, False) for raw in parts] + ([(tail, True)] if tail else [])
    objs = []
    for i, (raw, is_tail) in enumerate(items):
        c["lines"] += 1
        try:
            line: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = None
        if line is not None and not line.strip(BLANK):
            c["blank"] += 1
            continue
        obj = None
        if line is not None:
            if i == 0:
                line = line.removeprefix("\ufeff")
            try:
                obj = json.loads(line, parse_constant=str)
            except (ValueError, RecursionError):
                obj = None
        if type(obj) is dict:
            objs.append(obj)
            continue
        c["garbage"] += 1
        if is_tail:
            c["torn_last_line"] = True
        elif line is None:
            c["invalid_utf8"] += 1
            if len(ref.invalid_utf8_line_numbers) < 20:
                ref.invalid_utf8_line_numbers.append(i + 1)
        elif len(ref.garbage_line_numbers) < 20:
            ref.garbage_line_numbers.append(i + 1)
    return objs


def _schema(obj: dict, ref: Reference, c: dict[str, object]) -> None:
    if SCHEMA_KEY not in obj or obj[SCHEMA_KEY] is None:
        return
    v = obj[SCHEMA_KEY]
    integral = type(v) is int or (type(v) is float and math.isfinite(v) and v.is_integer())
    if not integral or v < 1:
        c["bad_schema"] += 1
    elif v > HISTORY_SCHEMA:
        ref.newer = ref.newer or int(v)
    else:
        c["schema"] = max(c["schema"] or 0, int(v))


def _row(obj: dict, ref: Reference, c: dict, carried: dict, valued: set, bad_keys: set) -> None:
    step = obj.get("step")
    f = NONFINITE[step] if type(step) is str and step in NONFINITE else _number(step)
    if f is None or not math.isfinite(f) or abs(f) >= 2.0**63:
        c["no_step"] += 1
        return
    cells, dropped = {}, set()
    for key, v in obj.items():
        if key in ("step", SCHEMA_KEY):
            continue
        if not _encodable(key):
            bad_keys.add(key)
            continue
        carried.setdefault(key)
        if v is None:
            continue
        if type(v) is str and v in NONFINITE:
            cells[key] = NONFINITE[v]
            c["nonfinite_values"] += 1
            valued.add(key)
        elif (x := _number(v)) is not None:
            cells[key] = x
            valued.add(key)
        else:
            dropped.add(key)
            c["non_numeric"] += 1
            ref.non_numeric_keys[key] = ref.non_numeric_keys.get(key, 0) + 1
    ref.steps.append(int(f))
    ref.cells.append(cells)
    ref.dropped.append(dropped)


def _superseded(steps: list[int]) -> list[bool]:
    segment = [0]
    for a, b in itertools.pairwise(steps):
        segment.append(segment[-1] + (b < a))
    return [
        any(segment[j] > segment[i] and steps[j] <= steps[i] for j in range(i + 1, len(steps)))
        for i in range(len(steps))
    ]


def reference_read(data: bytes, *, dedupe_resumed: bool = True) -> Reference:
    """What ``read_history`` must return for a file holding ``data`` (see the module doc)."""
    ref = Reference()
    c: dict[str, object] = dict.fromkeys(
        ("lines", "blank", "garbage", "invalid_utf8", "no_step", "non_numeric",
         "nonfinite_values", "bad_schema", "non_monotonic", "superseded"), 0,
    )  # fmt: skip
    c.update(torn_last_line=False, schema=None, bytes_read=len(data))
    carried: dict[str, None] = {}
    valued: set[str] = set()
    bad_keys: set[str] = set()
    for obj in _objects(data, ref, c):
        _schema(obj, ref, c)
        _row(obj, ref, c, carried, valued, bad_keys)
    c["bad_keys"] = len(bad_keys)
    ref.columns = [k for k in carried if k in valued]
    c["non_monotonic"] = sum(b < a for a, b in itertools.pairwise(ref.steps))
    if dedupe_resumed and c["non_monotonic"]:
        keep = [not s for s in _superseded(ref.steps)]
        c["superseded"] = keep.count(False)
        ref.steps = [s for s, k in zip(ref.steps, keep, strict=True) if k]
        ref.cells = [r for r, k in zip(ref.cells, keep, strict=True) if k]
        ref.dropped = [d for d, k in zip(ref.dropped, keep, strict=True) if k]
    c["rows"] = len(ref.steps)
    ref.counts = c
    return ref


def assert_reads_like_reference(df: pd.DataFrame, stats, ref: Reference) -> None:
    """The reader's frame and counters equal the reference's, cell for cell."""
    assert list(df.columns) == ["step", *ref.columns]
    assert df["step"].dtype == np.int64 and df["step"].tolist() == ref.steps
    for key in ref.columns:
        col = df[key].to_numpy()
        expected = np.array([row.get(key, np.nan) for row in ref.cells], dtype=float)
        assert col.dtype == np.float64, key
        assert np.array_equal(col, expected, equal_nan=True), (key, col, expected)
    got = stats.to_dict()
    assert {k: got[k] for k in ref.counts} == ref.counts
    assert stats.garbage_line_numbers == ref.garbage_line_numbers
    assert stats.invalid_utf8_line_numbers == ref.invalid_utf8_line_numbers
    assert stats.non_numeric_keys == ref.non_numeric_keys
    assert {k: v.tolist() for k, v in stats.dropped_rows.items()} == ref.dropped_rows()


# ----------------------------------------------------------------- the reference itself


def test_reference_reads_the_spec_examples():
    data = (
        b'\xef\xbb\xbf{"step": 1, "a": 1, "tdiag_history": 1}\n'
        b"\n"
        b'{"step": 2, "a": "NaN", "b": {"mean": 2}}\n'
        b'{"step": 2.7, "a": NaN, "c": null}\n'
        b'{"step": 3}{"step": 4}\n'
        b'{"step": "NaN", "a": 1}\n'
        b'{"step": 5, "k\xff": 1}\n'
        b'{"step": 1, "a": 10' + b"0" * 400 + b"}\n"
        b'{"step": 6, "a'
    )
    ref = reference_read(data)
    assert ref.columns == ["a"]  # b: only a non-number; c: only null
    assert ref.steps == [1]  # the resumed step-1 row supersedes the rows of steps 1..2
    assert ref.dropped == [{"a"}]  # its huge integer was dropped
    c = ref.counts
    assert (c["lines"], c["blank"], c["garbage"], c["invalid_utf8"]) == (9, 1, 3, 1)
    assert c["torn_last_line"] and c["no_step"] == 1 and c["schema"] == 1
    assert (c["non_numeric"], c["nonfinite_values"], c["superseded"]) == (2, 2, 3)
    assert ref.garbage_line_numbers == [5] and ref.invalid_utf8_line_numbers == [7]

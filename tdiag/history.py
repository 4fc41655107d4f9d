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

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from tdiag.findings import TdiagError, to_jsonable

__all__ = [
    "HISTORY_FILE",
    "HISTORY_SCHEMA",
    "SCHEMA_KEY",
    "HistoryReadError",
    "HistorySchemaError",
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

HISTORY_SCHEMA = 1
"""The history format this tdiag writes, and the newest it reads."""
SCHEMA_KEY = "tdiag_history"
"""Reserved key of the format version, on the first row of each writer; never a column."""

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_BLANK = " \t\r\x0b\x0c"  # what bytes.strip() strips, besides the newline itself
_STEP_LIMIT = 2.0**63  # a step must fit an int64
_SCAN_ERRORS = (StopIteration, ValueError, RecursionError)  # ValueError: JSONDecodeError too


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


def _ends_torn(path: Path) -> bool:
    """True when ``path`` is a file that does not end with a newline (a write cut short by
    a crash or a full disk). False when that cannot be told (missing, a pipe, unreadable):
    the writer then adds nothing."""
    if not path.is_file():  # opening a named pipe to look would block
        return False
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, os.SEEK_END) == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


class HistoryWriter:
    """Append rows to a history.jsonl, one strict-JSON line per row, flushed per line.

    The first row written carries ``SCHEMA_KEY: HISTORY_SCHEMA`` (the key is reserved: a
    metric of that name is dropped). When the file ends with a cut-off line, the first row
    starts on a new line, so that the torn fragment costs only itself.

    Args:
        path: the file (created with its folder; appended to if it exists, e.g. on resume).
        fsync: also ``os.fsync`` after each line (survives power loss, costs a syscall).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._lead = "\n" if _ends_torn(self.path) else ""
        self._stamp = True
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row. Raises ValueError if the row has no ``step``."""
        if self._fh is None:
            raise ValueError(f"history writer for {self.path} is closed")
        if "step" not in row:
            raise ValueError(f"a history row needs a 'step', got keys {sorted(row)!r}")
        obj = to_jsonable(dict(row))
        obj.pop(SCHEMA_KEY, None)
        if self._stamp:
            obj[SCHEMA_KEY] = HISTORY_SCHEMA
        line = json.dumps(obj, allow_nan=False, separators=(",", ":"))
        self._fh.write(self._lead + line + "\n")  # one write: the newline never lags behind
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())
        self._lead, self._stamp = "", False

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
    """What the tolerant reader saw. ``problems`` lists human-readable sentences.

    ``garbage`` counts every non-blank line that gave no row: not JSON, not one object,
    too deeply nested, not UTF-8 (also counted in ``invalid_utf8``), or the torn last line.
    ``non_numeric`` counts values that were not numbers (strings, objects, lists, integers
    beyond float range): they are dropped, the cell reads as missing, never as NaN.
    ``dropped_rows`` gives, per column, the row positions in the returned frame whose value
    was dropped, so that a consumer can tell them from a logged NaN.
    """

    lines: int = 0
    rows: int = 0
    blank: int = 0
    garbage: int = 0
    torn_last_line: bool = False
    no_step: int = 0
    non_monotonic: int = 0
    superseded: int = 0
    nonfinite_values: int = 0
    invalid_utf8: int = 0
    non_numeric: int = 0
    bad_keys: int = 0
    bad_schema: int = 0
    schema: int | None = None
    bytes_read: int = 0
    garbage_line_numbers: list[int] = field(default_factory=list)
    invalid_utf8_line_numbers: list[int] = field(default_factory=list)
    non_numeric_keys: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.torn_last_line:
            out.append("the last line was cut off (torn write, or still being written); skipped")
        n_bad = self.garbage - self.invalid_utf8 - (1 if self.torn_last_line else 0)
        if n_bad > 0:
            first = ", ".join(str(n) for n in self.garbage_line_numbers[:5])
            out.append(
                f"{n_bad} line(s) were not valid JSON objects and were skipped (lines {first}…)"
            )
        if self.invalid_utf8:
            first = ", ".join(str(n) for n in self.invalid_utf8_line_numbers[:5])
            out.append(
                f"{self.invalid_utf8} line(s) were not valid UTF-8 and were skipped "
                f"(lines {first}…)"
            )
        if self.no_step:
            out.append(f"{self.no_step} row(s) had no numeric 'step' and were skipped")
        if self.non_numeric:
            top = sorted(self.non_numeric_keys.items(), key=lambda kv: -kv[1])[:3]
            where = ", ".join(f"{_short(k)}: {n}" for k, n in top)
            out.append(
                f"{self.non_numeric} value(s) were not numbers and were dropped ({where}"
                f"{', …' if len(self.non_numeric_keys) > 3 else ''})"
            )
        if self.bad_keys:
            out.append(f"{self.bad_keys} metric name(s) were not valid Unicode; dropped")
        if self.bad_schema:
            out.append(f"{self.bad_schema} unreadable '{SCHEMA_KEY}' format marker(s) ignored")
        if self.non_monotonic:
            out.append(
                f"step went backwards {self.non_monotonic} time(s) (a resumed run?): "
                f"the {self.superseded} earlier row(s) of the replayed steps were dropped"
            )
        if self.nonfinite_values:
            out.append(f"{self.nonfinite_values} non-finite value(s) (NaN/Inf)")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The counters (JSON-safe; ``dropped_rows`` left out) and the problem sentences."""
        return {**{n: getattr(self, n) for n in _COUNTERS}, "problems": self.problems}


_COUNTERS = ("lines", "rows", "blank", "garbage", "torn_last_line", "no_step", "non_monotonic",
             "superseded", "nonfinite_values", "invalid_utf8", "non_numeric", "bad_keys",
             "bad_schema", "schema", "bytes_read")  # fmt: skip


def _short(key: str, n: int = 40) -> str:
    """A metric name fit for a sentence: escaped if it holds control characters, cut."""
    key = key if key.isprintable() else ascii(key)
    return key if len(key) <= n else key[: n - 1] + "…"


def _parse_constant(token: str) -> float:
    return _NONFINITE[token]


def read_history(
    path: str | os.PathLike[str], *, dedupe_resumed: bool = True
) -> tuple[pd.DataFrame, ReadStats]:
    """Read a history.jsonl (or a run folder containing one) into a DataFrame.

    Columns: ``step`` (int64), then one float64 column per metric in order of first
    appearance (NaN where a row did not carry it). Rows stay in file order; with
    ``dedupe_resumed``, when the step goes backwards (a run resumed from a checkpoint
    replays steps), the earlier rows of the replayed steps are dropped: the resumed run's
    rows win, whole (a NaN it logged is not back-filled).

    Every line is judged on its own: a row is a line that is valid UTF-8 holding exactly one
    JSON object with a finite numeric ``step``. Values that are not numbers are dropped and
    counted (``ReadStats.non_numeric``). Only the bytes present at open are read.

    The file is read in blocks of about 4 MiB, parsed with one call of the C JSON scanner
    per block when that provably judges each line alone (see ``_Reader._joined``), else
    one per line, and turned into columns by pandas: memory stays near the size of the
    resulting frame and the cost is linear in rows (1M rows x 20 metrics: ~13 s, one core).

    Raises:
        HistorySchemaError: a row declares a newer format (:data:`HISTORY_SCHEMA`).
        HistoryReadError: the file is missing, unreadable, or holds no readable row.
    """
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise HistoryReadError(f"no history file at {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        raise HistoryReadError(f"cannot read {path}: {exc}") from exc
    reader = _Reader(path)
    try:
        with fh:
            reader.read(fh)
    except OSError as exc:
        raise HistoryReadError(f"cannot read {path}: {exc}") from exc
    return reader.finish(dedupe_resumed)


def _blocks(fh: IO[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """The first ``size`` bytes of ``fh`` as ``(complete lines, False)`` blocks of about
    ``_BLOCK_BYTES``, then ``(what follows the last newline, True)``."""
    remaining, pending = size, []
    while remaining > 0:
        data = fh.read(min(_BLOCK_BYTES, remaining))
        if not data:  # the file shrank while read
            break
        remaining -= len(data)
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # no newline yet: a long line continues
            pending.append(data)
            continue
        head = data[:cut] if cut < len(data) else data
        yield (b"".join([*pending, head]) if pending else head), False
        pending = [data[cut:]] if cut < len(data) else []
    yield b"".join(pending), True


# Bytes read and parsed per block: 4 MiB keeps the block's parsed rows (Python dicts,
# several times the text) small beside the frame; larger blocks were no faster.
_BLOCK_BYTES = 1 << 22


class _Reader:
    """One pass over a history file: lines -> records -> float columns, with the counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stats = ReadStats()
        # Bare NaN/Infinity tokens (Python's json writes them) come back as the strings of
        # the strict encoding: one path maps and counts both, per cell.
        self.decoder = json.JSONDecoder(parse_constant=str)
        self.lineno = 0  # lines judged so far
        self.n_rows = 0  # rows kept so far (before dedupe)
        self.steps: list[np.ndarray] = []
        self.blocks: list[tuple[int, dict[str, np.ndarray]]] = []
        self.dropped: dict[str, list[np.ndarray]] = {}
        self.valued: set[str] = set()  # keys that had a number or a NaN/Infinity token
        self.bad_keys: set[str] = set()

    def read(self, fh: IO[bytes]) -> None:
        size = os.fstat(fh.fileno()).st_size
        for data, last in _blocks(fh, size):
            self.stats.bytes_read += len(data)
            records = self._tail(data) if last else self._lines(data)
            if records:
                self._columns(records)

    # ------------------------------------------------------------------ lines -> records
    def _lines(self, data: bytes) -> list[dict[str, Any]]:
        """The rows of a block of complete lines (``data`` ends with a newline)."""
        records = self._joined(data)
        if records is not None:
            self.lineno += len(records)
            self.stats.lines += len(records)
            return records
        try:
            lines: list[str | None] = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:  # judge each line's bytes alone: a bad one costs itself
            lines = [_utf8(raw) for raw in data.split(b"\n")]
        lines.pop()  # "" after the final newline
        first, records = self.lineno, []
        self.lineno += len(lines)
        self.stats.lines += len(lines)
        scan, append = self.decoder.scan_once, records.append
        for i, line in enumerate(lines):
            # One C scan that must consume the whole line and give an object; else the
            # slower judgement that also places whitespace, blank lines and garbage.
            if line is not None and line[:1] == "{":
                try:
                    obj, end = scan(line, 0)
                except _SCAN_ERRORS:
                    obj, end = None, -1
                if end == len(line) and type(obj) is dict:
                    append(obj)
                    continue
            if self._judge(line, first + i + 1, records) == "bad":
                self._bad(first + i + 1, utf8=line is None)
        return records

    def _joined(self, data: bytes) -> list[dict[str, Any]] | None:
        """All lines of ``data`` in one parse, when that provably judges each line alone.

        Every line here starts with "{", ends with "}" and holds no other "{" (checked with
        numpy over the block). If the lines joined as one JSON array then give one object
        per line, the k-th object opens at the only "{" of line k, and as only the
        separator may follow it, closes at the line's end: it is line k, parsed as if
        alone. Other blocks (a "{" in a string, two objects on a line, whitespace, a blank
        line, bytes that are not UTF-8) are judged line by line.
        """
        a = np.frombuffer(data, dtype=np.uint8)
        nl = np.flatnonzero(a == 10)  # "\n"; the block ends with one
        if (
            a[0] != 123  # "{"
            or not (a[nl - 1] == 125).all()  # "}" ends each line
            or not (a[nl[:-1] + 1] == 123).all()  # "{" starts each line
            or np.count_nonzero(a == 123) != len(nl)
        ):
            return None
        joined = bytearray(b"[") + data
        np.frombuffer(joined, dtype=np.uint8)[nl + 1] = 44  # "\n" -> ","
        joined[-1] = 93  # "]"
        try:
            objs = self.decoder.decode(joined.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return None
        if len(objs) != len(nl) or set(map(type, objs)) != {dict}:
            return None
        return objs

    def _tail(self, data: bytes) -> list[dict[str, Any]]:
        """The bytes after the last newline: a complete row whose newline is missing, or the
        torn last line (a crash, a full disk, or the line the writer is writing now)."""
        if not data:
            return []
        self.lineno += 1
        self.stats.lines += 1
        records: list[dict[str, Any]] = []
        if self._judge(_utf8(data), self.lineno, records) == "bad":
            self.stats.garbage += 1  # counted, but not among the mid-file line numbers
            self.stats.torn_last_line = True
        return records

    def _judge(self, line: str | None, lineno: int, out: list[dict[str, Any]]) -> str:
        """One line, parsed alone: "row" (appended to ``out``), "blank" or "bad"."""
        if line is None:
            return "bad"
        if not line.strip(_BLANK):
            self.stats.blank += 1
            return "blank"
        if lineno == 1 and line.startswith("\ufeff"):  # a UTF-8 byte-order mark
            line = line[1:]
        try:
            obj = self.decoder.decode(line)  # whitespace around is fine; "Extra data" is not
        except (ValueError, RecursionError):
            return "bad"
        if type(obj) is not dict:
            return "bad"
        out.append(obj)
        return "row"

    def _bad(self, lineno: int, *, utf8: bool) -> None:
        st = self.stats
        st.garbage += 1
        if utf8:
            st.invalid_utf8 += 1
            if len(st.invalid_utf8_line_numbers) < 20:
                st.invalid_utf8_line_numbers.append(lineno)
        elif len(st.garbage_line_numbers) < 20:
            st.garbage_line_numbers.append(lineno)

    # --------------------------------------------------------------- records -> columns
    def _columns(self, records: list[dict[str, Any]]) -> None:
        """A block of records as float columns; rows without a usable step are dropped."""
        st = self.stats
        frame = pd.DataFrame.from_records(records)
        if SCHEMA_KEY in frame.columns:  # from the records: a column may have lost digits
            del frame[SCHEMA_KEY]
            self._schema([r[SCHEMA_KEY] for r in records if SCHEMA_KEY in r])
        if "step" not in frame.columns:
            st.no_step += len(records)  # not len(frame): [{}] gives a frame of no rows
            return
        step = _floats(frame["step"])[0]
        ok = np.isfinite(step) & (np.abs(step) < _STEP_LIMIT)
        keys = list(frame.columns)
        if not ok.all():
            st.no_step += int(len(ok) - ok.sum())
            frame, step = frame.loc[ok], step[ok]
            # the kept rows' keys, in the order they first carry them
            kept = (r for r, k in zip(records, ok, strict=True) if k)
            keys = list(dict.fromkeys(chain.from_iterable(kept)))
        if not len(step):
            return
        columns: dict[str, np.ndarray] = {}
        for key in keys:
            if key == "step" or key == SCHEMA_KEY:
                continue
            if not key.isascii() and not _encodable(key):
                self.bad_keys.add(key)
                continue
            values, bad, n_tokens = _floats(frame[key])
            st.nonfinite_values += n_tokens
            if len(bad):
                st.non_numeric += len(bad)
                st.non_numeric_keys[key] = st.non_numeric_keys.get(key, 0) + len(bad)
                self.dropped.setdefault(key, []).append(bad + self.n_rows)
            if key not in self.valued and (n_tokens or not np.isnan(values).all()):
                self.valued.add(key)
            columns[key] = values
        self.steps.append(step.astype(np.int64))
        self.blocks.append((len(step), columns))
        self.n_rows += len(step)

    def _schema(self, markers: list[Any]) -> None:
        """Check the format markers of a block (null: as if absent)."""
        for v in markers:
            if v is None:
                continue
            integral = type(v) is int or (type(v) is float and math.isfinite(v) and v.is_integer())
            if not integral or v < 1:
                self.stats.bad_schema += 1
            elif v > HISTORY_SCHEMA:
                raise HistorySchemaError(self.path, int(v))
            else:
                self.stats.schema = max(self.stats.schema or 0, int(v))

    # ------------------------------------------------------------------ the frame
    def finish(self, dedupe_resumed: bool) -> tuple[pd.DataFrame, ReadStats]:
        st = self.stats
        st.bad_keys = len(self.bad_keys)
        if self.n_rows == 0:
            raise HistoryReadError(
                f"{self.path} holds no readable row ({st.lines} line(s), {st.garbage} not "
                f"JSON, {st.no_step} without a step)"
            )
        steps = _concat(self.steps)
        st.non_monotonic = int(np.count_nonzero(steps[1:] < steps[:-1]))
        keep = None
        if dedupe_resumed and st.non_monotonic:
            keep = ~_superseded(steps)
            st.superseded = int(len(steps) - keep.sum())
            steps = steps[keep]
        st.rows = len(steps)
        st.dropped_rows = self._dropped_rows(keep)
        # A key with no number and no NaN/Infinity token (only non-numbers, nulls, or rows
        # without a step) has no column: it is not a metric that was logged as NaN.
        keys = [k for k in dict.fromkeys(k for _, cols in self.blocks for k in cols)
                if k in self.valued]  # fmt: skip
        # Filled column by column into one (rows, metrics) float block: pandas keeps it as
        # is, so the frame costs its own size once, not once per copy.
        out = np.empty((len(steps), len(keys)), dtype=np.float64, order="F")
        src = dst = 0
        for n, cols in self.blocks:
            kb = None if keep is None else keep[src : src + n]
            m = n if kb is None else int(kb.sum())
            for j, key in enumerate(keys):
                arr = cols.get(key)
                out[dst : dst + m, j] = np.nan if arr is None else arr if kb is None else arr[kb]
            src, dst = src + n, dst + m
        self.blocks.clear()
        df = pd.DataFrame(out, columns=keys, copy=False)
        df.insert(0, "step", steps)
        return df, st

    def _dropped_rows(self, keep: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {}
        for key, parts in self.dropped.items():
            pos = _concat(parts)
            if keep is not None:
                pos = (np.cumsum(keep) - 1)[pos[keep[pos]]]
            if len(pos):
                out[key] = pos
        return out


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _encodable(key: str) -> bool:
    """False for a name with a lone surrogate (a "\\ud800" escape): not text a report
    could write."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _floats(col: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """A column as float64, the positions of its non-number values (dropped: NaN, as a
    missing cell) and how many "NaN"/"Infinity"/"-Infinity" strings it held."""
    kind = col.dtype.kind
    if kind == "f":
        return col.to_numpy(dtype=np.float64), _NO_POS, 0
    if kind in "iub":
        return col.to_numpy().astype(np.float64), _NO_POS, 0
    values = col.to_numpy(dtype=object)
    out = np.full(len(values), np.nan)
    bad, n_nonfinite = [], 0
    for i, v in enumerate(values):
        t = type(v)
        if t is float:
            out[i] = v
        elif t is int or t is bool:  # bool is an int: read as 0.0/1.0
            try:
                out[i] = v
            except OverflowError:  # beyond float range: not a number we can hold
                bad.append(i)
        elif t is str and v in _NONFINITE:
            out[i] = _NONFINITE[v]
            n_nonfinite += 1
        elif v is not None and v is not pd.NA:
            bad.append(i)
    return out, np.array(bad, dtype=np.int64), n_nonfinite


_NO_POS = np.empty(0, dtype=np.int64)


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


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read events.jsonl (Findings raised live), up to its size at open. Lines that are not
    UTF-8 JSON objects are skipped; a missing file gives []."""
    from tdiag.findings import from_jsonable

    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        data = fh.read(os.fstat(fh.fileno()).st_size)
    out = []
    for raw in data.split(b"\n"):
        line = _utf8(raw)
        if line is None or not line.strip(_BLANK):
            continue
        try:
            obj = from_jsonable(json.loads(line, parse_constant=_parse_constant))
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out

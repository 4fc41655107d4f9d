"""Read a history.jsonl into a DataFrame, totally: every line judged alone, every
problem counted in :class:`~tdiag.history.stats.ReadStats`, :class:`HistoryReadError` the
only error (see the package docstring)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from tdiag.history.columns import BLANK, concat, encodable, floats, superseded, utf8
from tdiag.history.format import (
    DROPPED_ATTR,
    HISTORY_FILE,
    HISTORY_SCHEMA,
    SCHEMA_KEY,
    HistoryReadError,
    HistorySchemaError,
)
from tdiag.history.stats import ReadStats

if TYPE_CHECKING:  # pandas is imported where a frame is made: `import tdiag` stays light
    import pandas as pd

__all__ = ["read_history"]

_STEP_LIMIT = 2.0**63  # a step must fit an int64
_SCAN_ERRORS = (StopIteration, ValueError, RecursionError)  # ValueError: JSONDecodeError too


def _fast_loads(data: bytearray) -> Any:
    """The block parsed by orjson (3-4x json's speed on 1M rows), or None to fall back.

    orjson refuses what json accepts differently (bare NaN/Infinity tokens, numbers beyond
    float range, lone surrogates, invalid UTF-8, very deep nesting): any refusal sends the
    block to the json path, which judges those cells as before. What orjson accepts, it
    reads as json does (strict JSON, the last of duplicate keys wins)."""
    try:
        import orjson
    except ImportError:  # a declared dependency, but a reader must not need it
        return None
    try:
        return orjson.loads(bytes(data))
    except orjson.JSONDecodeError:
        return None


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
            lines = [utf8(raw) for raw in data.split(b"\n")]
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
        objs = _fast_loads(joined)
        if objs is None:
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
        if self._judge(utf8(data), self.lineno, records) == "bad":
            self.stats.garbage += 1  # counted, but not among the mid-file line numbers
            self.stats.torn_last_line = True
        return records

    def _judge(self, line: str | None, lineno: int, out: list[dict[str, Any]]) -> str:
        """One line, parsed alone: "row" (appended to ``out``), "blank" or "bad"."""
        if line is None:
            return "bad"
        if not line.strip(BLANK):
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
        import pandas as pd

        frame = pd.DataFrame.from_records(records)
        if SCHEMA_KEY in frame.columns:  # from the records: a column may have lost digits
            del frame[SCHEMA_KEY]
            self._schema([r[SCHEMA_KEY] for r in records if SCHEMA_KEY in r])
        if "step" not in frame.columns:
            st.no_step += len(records)  # not len(frame): [{}] gives a frame of no rows
            return
        step = floats(frame["step"])[0]
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
            if not key.isascii() and not encodable(key):
                self.bad_keys.add(key)
                continue
            values, bad, n_tokens = floats(frame[key])
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
        steps = concat(self.steps)
        st.non_monotonic = int(np.count_nonzero(steps[1:] < steps[:-1]))
        keep = None
        if dedupe_resumed and st.non_monotonic:
            keep = ~superseded(steps)
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
        import pandas as pd

        df = pd.DataFrame(out, columns=keys, copy=False)
        df.insert(0, "step", steps)
        if st.dropped_rows:  # travels with the frame to its consumers (the report's rules)
            df.attrs[DROPPED_ATTR] = {
                k: tuple(v.tolist()) for k, v in st.dropped_rows.items() if k in keys
            }
        return df, st

    def _dropped_rows(self, keep: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {}
        for key, parts in self.dropped.items():
            pos = concat(parts)
            if keep is not None:
                pos = (np.cumsum(keep) - 1)[pos[keep[pos]]]
            if len(pos):
                out[key] = pos
        return out

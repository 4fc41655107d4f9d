"""Write the history (and other run files) append-only or atomically.

A history row is one strict-JSON line, written with its newline in one ``write`` and
flushed: a reader can follow the file while training writes it, and a crash loses at most
the line in flight. Reports and meta.json are written through a temporary file + rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from tdiag.findings import to_jsonable
from tdiag.history.format import HISTORY_SCHEMA, SCHEMA_KEY

__all__ = ["HistoryWriter", "ends_torn", "write_json_atomic", "write_text_atomic"]


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


def ends_torn(path: Path) -> bool:
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


_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode

try:  # ~6x faster than the json module for a row of floats (docs/performance.md)
    from orjson import dumps as _fast_dumps
except ImportError:  # a declared dependency; without it rows are only slower to write
    _fast_dumps = None


def _encode_plain(obj: dict[str, Any]) -> bytes:
    """A plain row (see :func:`_plain`) as one compact JSON line's bytes. orjson when it
    can (same values back; names in raw UTF-8 instead of ``\\u`` escapes), else ``json``:
    integers beyond 64 bits and names with lone surrogates, which orjson refuses."""
    if _fast_dumps is not None:
        try:
            return _fast_dumps(obj)
        except TypeError:  # orjson.JSONEncodeError
            pass
    return _ENCODE(obj).encode("utf-8")


def _plain(row: Mapping[str, Any]) -> bool:
    """True when ``row`` is already strict JSON as it is: a dict of str keys (not the
    reserved one) to finite floats, ints, strings, bools or None."""
    if type(row) is not dict or SCHEMA_KEY in row:
        return False
    for key, v in row.items():
        t = type(v)
        if t is float:
            if v - v != 0.0:  # NaN or +-Inf (x - x is NaN for both)
                return False
        elif t is not int and t is not str and t is not bool and v is not None:
            return False
        if type(key) is not str:
            return False
    return True


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
        self._lead = b"\n" if ends_torn(self.path) else b""
        self._stamp = True
        self._fh: IO[bytes] | None = open(self.path, "ab")  # noqa: SIM115

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row. Raises ValueError if the row has no ``step``."""
        if self._fh is None:
            raise ValueError(f"history writer for {self.path} is closed")
        if "step" not in row:
            raise ValueError(f"a history row needs a 'step', got keys {sorted(row)!r}")
        if _plain(row):  # the Monitor's rows: encoded as they are, no copy
            line = _encode_plain({**row, SCHEMA_KEY: HISTORY_SCHEMA} if self._stamp else row)
        else:
            obj = to_jsonable(dict(row))
            obj.pop(SCHEMA_KEY, None)
            if self._stamp:
                obj[SCHEMA_KEY] = HISTORY_SCHEMA
            line = _ENCODE(obj).encode("utf-8")
        self._fh.write(self._lead + line + b"\n")  # one write: the newline never lags behind
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())
        self._lead, self._stamp = b"", False

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""ReadStats: what the tolerant reader saw, counted, and stated as sentences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tdiag.history.format import SCHEMA_KEY

__all__ = ["ReadStats"]


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

"""Cells to float columns, and the rows a resumed run superseded (the reader's helpers)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas loads with the first read, not with `from tdiag import Monitor`
    import pandas as pd

NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""The strict encoding of non-finite floats (Contract 3)."""
BLANK = " \t\r\x0b\x0c"  # what bytes.strip() strips, besides the newline itself


def concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encodable(key: str) -> bool:
    """False for a name with a lone surrogate (a "\\ud800" escape): not text a report
    could write."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pd_na() -> object:
    import pandas as pd

    return pd.NA


def floats(col: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
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
        elif t is str and v in NONFINITE:
            out[i] = NONFINITE[v]
            n_nonfinite += 1
        elif v is not None and v is not _pd_na():
            bad.append(i)
    return out, np.array(bad, dtype=np.int64), n_nonfinite


_NO_POS = np.empty(0, dtype=np.int64)


def superseded(steps: np.ndarray) -> np.ndarray:
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

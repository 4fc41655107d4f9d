"""A real history cut at every offset, and bit-flipped at every bit: the reader gives back
exactly the rows that were whole, and judges every corrupted line on its own.

The cut test covers every offset of four lines of the golden history (the first row,
with its format marker, a training row, the first validation row, the last row) and
every 97th offset elsewhere; ``TDIAG_CUT_ALL=1`` cuts at every one of its 35,938 offsets (figures in
docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_history_reference import assert_reads_like_reference, reference_read

from tdiag.history import HistoryReadError, read_history

GOLDEN = Path(__file__).parent / "fixtures" / "golden_history"
DATA = (GOLDEN / "history.jsonl").read_bytes()
ENDS = [i for i, b in enumerate(DATA) if b == 0x0A]  # offset of each line's newline
STARTS = [0, *(e + 1 for e in ENDS[:-1])]


def _cut_offsets() -> list[int]:
    if os.environ.get("TDIAG_CUT_ALL"):
        return list(range(len(DATA) + 1))
    offsets = set(range(0, len(DATA) + 1, 97))
    for line in (0, 1, 6, len(ENDS) - 1):  # line 7 is the first validation row
        offsets.update(range(STARTS[line], ENDS[line] + 2))
    return sorted(offsets)


def test_a_history_cut_anywhere_reads_back_the_whole_rows_before_the_cut(tmp_path):
    full, _ = read_history(GOLDEN)
    path = tmp_path / "history.jsonl"
    seen = Counter()
    with open(path, "w+b") as fh:
        for cut in _cut_offsets():
            fh.seek(0)
            fh.write(DATA[:cut])
            fh.truncate()
            fh.flush()
            # line k is whole once its closing brace is in; its newline may still be missing
            whole = sum(end <= cut for end in ENDS)
            torn = cut > 0 and cut not in ENDS and (cut - 1) not in ENDS
            if whole == 0:
                with pytest.raises(HistoryReadError):
                    read_history(path)
                seen["nothing readable"] += 1
                continue
            df, stats = read_history(path)
            expected = full.iloc[:whole]
            cols = [c for c in expected.columns if c == "step" or expected[c].notna().any()]
            assert list(df.columns) == cols, cut
            for col in cols:
                assert np.array_equal(
                    df[col].to_numpy(), expected[col].to_numpy(), equal_nan=True
                ), (cut, col)
            assert stats.torn_last_line == torn and stats.garbage == int(torn), cut
            assert stats.bytes_read == cut and stats.rows == whole
            seen["torn" if torn else "at a line end"] += 1
    assert sum(seen.values()) == len(_cut_offsets()) and seen["torn"] > 900
    print(f"{len(_cut_offsets())} cuts:", dict(seen))  # the figures of docs/reliability.md


def _flips(line: bytes) -> list[bytes]:
    out = []
    for i in range(len(line) * 8):
        flipped = bytearray(line)
        flipped[i // 8] ^= 1 << (i % 8)
        out.append(bytes(flipped))
    return out


def _kind(line: bytes, original: dict) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8"
    try:
        obj = json.loads(text, parse_constant=str)
    except (ValueError, RecursionError):
        return "not JSON"
    if type(obj) is not dict:
        return "not JSON"
    if obj.keys() != original.keys():
        return "a valid row with another key"
    return "a valid row, same keys"


def test_every_bit_flip_of_a_row_is_judged_on_its_own(tmp_path):
    """All 3,9xx flips of a real row in one file, each between clean rows: a flip that
    makes invalid UTF-8 is rejected and counted, never read with a mangled key."""
    lines = DATA.split(b"\n")
    row, original = lines[1], json.loads(lines[1])
    flips = _flips(row)
    kinds = Counter(_kind(f, original) for f in flips)
    path, invalid = tmp_path / "history.jsonl", 0
    for i in range(0, len(flips), 256):  # 256 a file: each flipped key is a new column
        body = b"".join(lines[0] + b"\n" + f + b"\n" for f in flips[i : i + 256])
        path.write_bytes(body)
        df, stats = read_history(path, dedupe_resumed=False)
        assert_reads_like_reference(df, stats, reference_read(body, dedupe_resumed=False))
        assert not any("\ufffd" in c for c in df.columns)
        invalid += stats.invalid_utf8
    assert invalid == kinds["invalid UTF-8"] > 0
    assert kinds["invalid UTF-8"] / len(flips) > 0.10  # a high bit set in ASCII: 1 in 8
    print(f"{len(flips)} flips:", dict(kinds))  # the figures of docs/reliability.md

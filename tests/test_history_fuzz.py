"""Fuzz: on any bytes, the history reader either returns exactly what the line-by-line
reference (test_history_reference.py) says, or raises HistoryReadError (HistorySchemaError
for a newer format): nothing else escapes it.

Inputs mix real-looking rows (every kind of JSON value, both NaN encodings, huge and
deep values, names with escapes), rows corrupted the ways files get corrupted (bit flips,
cuts, two objects on a line, CR/LF, stray bytes, braces in strings that could fool a
block-wise parse) and raw bytes, read with block sizes from 1 byte up so that block
boundaries fall everywhere. The example count is documented in docs/reliability.md;
``TDIAG_FUZZ_EXAMPLES=100000`` runs a longer campaign.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_history_reference import assert_reads_like_reference, reference_read

import tdiag.history.reader as history
from tdiag.history import HistoryReadError, HistorySchemaError, read_history

EXAMPLES = int(os.environ.get("TDIAG_FUZZ_EXAMPLES", "2000"))

KEYS = ["train/loss", "train/lr", "val/loss", "tdiag_history", "", "é/π", "\ud800", "k,}{"]
SCALARS = [
    0.5, -2.25, 1e-300, 1e300, 1e400, math.nan, math.inf, -math.inf, 0, 1, 2, -7, True, False,
    None, 2**53 + 1, 2**63, 2**63 - 1, -(2**63), 2**64, 10**30, 10**400, -(10**400),
    "NaN", "Infinity", "-Infinity", "nan", "x", "}", '"},{"', "{", "", "\ud800",
]  # fmt: skip


def _value(rng: random.Random, depth: int = 0):
    if depth < 3 and rng.random() < 0.15:
        if rng.random() < 0.5:
            return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(SCALARS) if rng.random() < 0.7 else rng.uniform(-1e6, 1e6)


def _strict(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


def _row(rng: random.Random) -> bytes:
    """One JSON object line, as a writer (ours, Python's json, or another) would write it."""
    row = {}
    if rng.random() < 0.9:  # usually a step
        row["step"] = rng.randint(-3, 40) if rng.random() < 0.8 else rng.choice(SCALARS)
    for _ in range(rng.randint(0, 5)):
        row[rng.choice(KEYS)] = _value(rng)
    style = rng.choice(["strict", "bare", "spaced"])
    if style == "strict":
        row = {k: _strict(v) for k, v in row.items()}
    return json.dumps(row, separators=None if style == "spaced" else (",", ":")).encode()


# Rows drawn once (seeded): hypothesis then picks, cuts, flips and joins them, which keeps
# each example cheap to generate (thousands in seconds) and still shrinkable.
POOL = [_row(random.Random(i)) for i in range(500)]
# Nesting far from the recursion limit either way (near it, the verdict would depend on
# how deep the caller's stack is).
DEEP = [b'{"step":1,"x":' + b"[" * d + b"]" * d + b"}" for d in (10, 400, 3000, 5000)]
SPECIALS = [b"", b" ", b"\r", b"\xef\xbb\xbf", b"\xff", b"null", b"[]", b"{}", b'{"step":1}']


def _fragment(rng: random.Random) -> bytes:
    """JSON-ish fragments: braces, brackets and quotes where a block-wise parse could trip."""
    return "".join(rng.choice('{}[]",:1aN \\') for _ in range(rng.randint(0, 14))).encode()


FRAGMENTS = [_fragment(random.Random(-i)) for i in range(1, 300)]
RAW = [random.Random(i).randbytes(i % 13).replace(b"\n", b"") for i in range(300)]


def line(v: int) -> bytes:
    """The line that one drawn integer stands for: its kind (a row as written, flipped,
    cut, doubled, deep, fragments, raw bytes, special), which one, and where to cut or
    flip. One integer per line keeps generation cheap; it shrinks towards plain rows."""
    kind, i, x = v % 12, (v >> 4) % len(POOL), v >> 13
    row = POOL[i]
    if kind <= 4:
        return row
    if kind == 5:  # a bit flip
        flipped = bytearray(row)
        flipped[(x // 8) % len(row)] ^= 1 << (x % 8)
        return bytes(flipped).replace(b"\n", b"")
    if kind == 6:  # cut short
        return row[: x % (len(row) + 1)]
    if kind == 7:  # two objects on a line, or padding
        sep = [b"", b",", b" ", b"\r", b"\t"][x % 5]
        return row + sep + (POOL[x % len(POOL)] if x % 3 else b"")
    if kind == 8:
        return DEEP[i % len(DEEP)]
    if kind == 9:
        return FRAGMENTS[i % len(FRAGMENTS)]
    if kind == 10:
        return RAW[i % len(RAW)]
    return SPECIALS[i % len(SPECIALS)]


LINE = st.integers(0, (1 << 30) - 1)


@st.composite
def files(draw) -> bytes:
    body = b"\n".join(line(v) for v in draw(st.lists(LINE, max_size=12)))
    ending = draw(st.integers(0, 9))
    if ending < 5:
        body += b"\n"
    if ending == 9:
        body = b"\xef\xbb\xbf" + body
    return body


@pytest.fixture(scope="module")
def history_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "history.jsonl"
    with open(path, "w+b") as fh:
        yield path, fh


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: CI never flakes on a new one
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    data=files(),
    block=st.sampled_from([1, 64, 1 << 22, 1 << 22, 1 << 22, 1 << 22]),
    dedupe=st.booleans(),
)
def test_reader_is_total_and_matches_the_reference(history_file, data, block, dedupe):
    path, fh = history_file
    fh.seek(0)  # rewritten in place: opening with O_TRUNC costs more than the read
    fh.write(data)
    fh.truncate()
    fh.flush()
    ref = reference_read(data, dedupe_resumed=dedupe)
    saved, history._BLOCK_BYTES = history._BLOCK_BYTES, block
    try:
        if ref.newer is not None:
            with pytest.raises(HistorySchemaError) as info:
                read_history(path, dedupe_resumed=dedupe)
            assert (info.value.found, info.value.supported) == (ref.newer, 1)
            return
        if not ref.steps:
            with pytest.raises(HistoryReadError) as info:
                read_history(path, dedupe_resumed=dedupe)
            assert type(info.value) is HistoryReadError and "no readable row" in str(info.value)
            return
        df, stats = read_history(path, dedupe_resumed=dedupe)
    finally:
        history._BLOCK_BYTES = saved
    assert_reads_like_reference(df, stats, ref)
    for sentence in stats.problems:  # fit for a report: printable, encodable
        assert sentence.isprintable() and sentence.encode("utf-8")

"""The history across real processes: a report read while training appends, a writer
killed with SIGKILL, a disk that fills up mid-line, and the run resumed after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdiag.history import read_history

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")

METRICS = [f"grad_norm/blocks.{i}" for i in range(20)]

# Writes rows first, first + 1, ... through the real HistoryWriter as fast as it can, until
# ``last`` (0: until killed); prints every ``every``-th step once write() has returned.
WRITER = r"""
import sys
from tdiag.history import HistoryWriter
path, step, last, every = sys.argv[1], *map(int, sys.argv[2:5])
metrics = [f"grad_norm/blocks.{i}" for i in range(20)]
with HistoryWriter(path) as w:
    while not last or step <= last:
        w.write({"step": step, "time": 0.5 * step, **{m: step + i / 64 for i, m in enumerate(metrics)}})
        if step % every == 0:
            print(step, flush=True)
        step += 1
"""

# The same writer on a disk that is full after LIMIT bytes (RLIMIT_FSIZE: the write that
# crosses it is cut short, as on a full disk). Prints the last step that was written whole.
FULL_DISK = r"""
import resource, signal, sys
from tdiag.history import HistoryWriter
path, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
metrics = [f"grad_norm/blocks.{i}" for i in range(20)]
w = HistoryWriter(path)
step = 0
try:
    while True:
        w.write({"step": step + 1, "time": 0.5 * (step + 1), **{m: step + 1 + i / 64 for i, m in enumerate(metrics)}})
        step += 1
except OSError as exc:
    print(step, exc.errno, flush=True)
"""


def _writer(path: Path, first: int = 1, last: int = 0, every: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(first), str(last), str(every)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen) -> list[str]:
    """SIGKILL (no flush, no close, no atexit); what it printed until then."""
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read().split()
    proc.wait()
    proc.stdout.close()
    return rest


def _check_rows(df, first: int = 1) -> None:
    """Consecutive steps from ``first``, each row whole (every metric as written)."""
    steps = df["step"].to_numpy()
    assert steps.tolist() == list(range(first, first + len(df)))
    for i, m in enumerate(METRICS[:3]):
        assert (df[m].to_numpy() == steps + i / 64).all()


def test_a_report_read_while_training_appends_sees_only_whole_rows(tmp_path):
    path = tmp_path / "history.jsonl"
    proc = _writer(path, every=1000)  # prints rarely: a full pipe would stop it
    try:
        for line in proc.stdout:  # a history big enough that reading it takes a while
            if int(line) >= 10_000:
                break
        seen, chased, worst = 0, 0, 0.0
        for _ in range(4):
            before = path.stat().st_size
            t0 = time.perf_counter()
            df, stats = read_history(path)
            worst = max(worst, time.perf_counter() - t0)
            after = path.stat().st_size
            assert before <= stats.bytes_read <= after  # what was there at open, no more
            chased += stats.bytes_read < after  # the writer went on; the reader did not follow
            assert stats.garbage == int(stats.torn_last_line)  # at most the line in flight
            assert len(stats.problems) <= 1 and not stats.invalid_utf8
            _check_rows(df)
            assert len(df) >= seen
            seen = len(df)
        assert chased >= 1 and worst < 30
    finally:
        _stop(proc)


def test_a_killed_writer_loses_at_most_the_line_in_flight(tmp_path):
    path = tmp_path / "history.jsonl"
    proc = _writer(path)
    last = 0
    for line in proc.stdout:
        last = int(line)
        if last >= 3_000:
            break
    last = max([last, *map(int, _stop(proc))])  # the last step whose write() had returned
    df, stats = read_history(path)
    _check_rows(df)
    assert last <= len(df) <= last + 1  # every row written whole, and the one in flight
    assert stats.garbage == int(stats.torn_last_line) and stats.rows == len(df)


def test_a_full_disk_tears_one_line_and_the_resumed_run_keeps_its_first_row(tmp_path):
    path = tmp_path / "history.jsonl"
    limit = 50_003  # bytes: lands inside a row
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    whole, errno = int(out[0]), int(out[1])
    assert errno == 27 and path.stat().st_size == limit  # EFBIG: the disk is "full"
    assert not path.read_bytes().endswith(b"\n")
    df, stats = read_history(path)
    _check_rows(df)
    assert len(df) == whole and stats.torn_last_line and "cut off" in stats.problems[0]
    torn_line = stats.lines
    # The run is resumed once space is back: the new writer's first row must survive.
    resumed = _writer(path, whole + 1, whole + 5)
    assert resumed.wait(timeout=120) == 0
    resumed.stdout.close()
    df, stats = read_history(path)
    _check_rows(df)
    assert len(df) == whole + 5 and not stats.torn_last_line
    assert stats.garbage == 1 and stats.garbage_line_numbers == [torn_line]
    assert os.path.getsize(path) > limit

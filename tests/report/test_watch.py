"""``tdiag report RUN_DIR --watch``: the incremental reader (only complete new lines, a
byte offset, resumed runs, files that shrink) and the watch itself, with a real writer
process appending while ``tdiag report --watch`` runs, then Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tdiag.history import DROPPED_ATTR, HistoryWriter, read_history
from tdiag.report.watch import IncrementalHistory, add_refresh, watch_report


def _rows(path: Path, steps, **extra) -> None:
    with HistoryWriter(path) as w:
        for s in steps:
            w.write({"step": s, "train/loss": 5.0 / (s + 1), **extra})


def test_only_complete_new_lines_are_read_and_match_a_full_read(tmp_path):
    path = tmp_path / "history.jsonl"
    _rows(path, range(0, 10))
    inc = IncrementalHistory(path)
    assert inc.poll() == 10
    first_offset = inc.offset
    assert first_offset == path.stat().st_size
    with open(path, "a", encoding="utf-8") as fh:  # a line in flight, no newline yet
        fh.write('{"step": 10, "train/loss": 0.4')
        fh.flush()
        assert inc.poll() == 0 and inc.offset == first_offset
        fh.write(', "val/loss": 0.5}\n{"step": 11, "train/lo')
        fh.flush()
        assert inc.poll() == 1
        fh.write('ss": 0.3}\nnot json\n\n')
    assert inc.poll() == 1
    df, stats = inc.frame()
    full, full_stats = read_history(path)
    pd.testing.assert_frame_equal(df, full)
    assert stats.garbage == full_stats.garbage == 1
    assert stats.blank == full_stats.blank
    assert stats.rows == full_stats.rows == 12
    assert inc.offset == path.stat().st_size


def test_a_resumed_run_replaces_the_replayed_steps_across_chunks(tmp_path):
    path = tmp_path / "history.jsonl"
    _rows(path, range(0, 20))
    inc = IncrementalHistory(path)
    inc.poll()
    _rows(path, range(15, 25), **{"train/lr": 1e-3})  # resumed from the step-15 checkpoint
    inc.poll()
    df, stats = inc.frame()
    full, full_stats = read_history(path)
    assert list(df["step"]) == list(full["step"]) == [*range(0, 15), *range(15, 25)]
    assert df["train/lr"].notna().sum() == 10
    assert (stats.non_monotonic, stats.superseded) == (full_stats.non_monotonic, 5)
    assert full_stats.superseded == 5


def test_a_row_of_the_same_step_in_the_next_chunk_is_not_a_resume(tmp_path):
    path = tmp_path / "history.jsonl"
    _rows(path, range(0, 10))
    inc = IncrementalHistory(path)
    inc.poll()
    with HistoryWriter(path) as w:
        w.write({"step": 9, "val/loss": 0.9})  # the evaluation of step 9, written after
    inc.poll()
    df, _ = inc.frame()
    pd.testing.assert_frame_equal(df, read_history(path)[0])
    assert len(df) == 11


def test_dropped_cells_keep_their_place_in_the_joined_frame(tmp_path):
    path = tmp_path / "history.jsonl"
    _rows(path, range(0, 5))
    inc = IncrementalHistory(path)
    inc.poll()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"step": 5, "train/loss": "oops"}\n{"step": 6, "train/loss": 0.7}\n')
    inc.poll()
    df, stats = inc.frame()
    full, _ = read_history(path)
    assert df.attrs[DROPPED_ATTR] == full.attrs[DROPPED_ATTR] == {"train/loss": (5,)}
    assert stats.non_numeric == 1


def test_a_file_that_shrinks_is_read_again(tmp_path):
    path = tmp_path / "history.jsonl"
    _rows(path, range(0, 30))
    inc = IncrementalHistory(path)
    inc.poll()
    path.unlink()
    _rows(path, range(0, 3))  # a new run in the same folder
    assert inc.poll() == 3 and inc.resets == 1
    assert list(inc.frame()[0]["step"]) == [0, 1, 2]


def test_add_refresh_puts_the_tag_in_the_head():
    html = add_refresh("<!DOCTYPE html><html><head><title>x</title></head></html>", 2.5)
    assert '<head>\n<meta http-equiv="refresh" content="3">' in html


def test_watch_rebuilds_on_growth_only(tmp_path):
    run = tmp_path / "run"
    _rows(run / "history.jsonl", range(0, 30))
    seen: list[int] = []
    looks = {"n": 0}

    def fake_sleep(_: float) -> None:  # the "writer": grows the history on some looks
        looks["n"] += 1
        if looks["n"] in (1, 3):
            start = 30 + 10 * (looks["n"] // 2)
            _rows(run / "history.jsonl", range(start, start + 10))

    builds = watch_report(
        run, interval=0.5, on_build=lambda r: seen.append(r["summary"]["rows"]),
        should_stop=lambda: looks["n"] >= 5, sleep=fake_sleep,
    )  # fmt: skip
    assert builds == 3 and seen == [30, 40, 50]  # no rebuild on the looks that saw nothing
    html = (run / "report.html").read_text()
    assert '<meta http-equiv="refresh" content="1">' in html
    assert json.loads((run / "report.json").read_text())["summary"]["rows"] == 50
    with pytest.raises(ValueError, match="interval"):
        watch_report(run, interval=0)


_WRITER = """
import sys, time
from tdiag.history import HistoryWriter
with HistoryWriter(sys.argv[1]) as w:
    for step in range(int(sys.argv[2])):
        w.write({"step": step, "train/loss": 5.0 / (step + 1), "perf/tokens_per_sec": 1000.0})
        time.sleep(0.02)
"""


def test_watch_follows_a_real_writer_and_ctrl_c_ends_cleanly(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tdiag.cli", "report", str(run), "--watch", "--interval", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        writer = subprocess.run(
            [sys.executable, "-c", _WRITER, str(run / "history.jsonl"), "120"],
            env=env, timeout=60, check=True,
        )  # fmt: skip
        assert writer.returncode == 0
        deadline = time.monotonic() + 60
        rows = 0
        while time.monotonic() < deadline:  # the watcher catches up with the last rows
            try:
                rows = json.loads((run / "report.json").read_text())["summary"]["rows"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                rows = 0
            if rows == 120:
                break
            time.sleep(0.2)
        assert rows == 120
        watcher.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    assert err.count("rows,") >= 2, err  # rebuilt more than once while the run grew
    html = (run / "report.html").read_text()
    assert 'http-equiv="refresh"' in html
    full, _ = read_history(run)
    assert len(full) == 120


def test_watch_cli_refuses_json_and_several_runs(tmp_path):
    from tdiag.report.watch import watch_cli

    assert watch_cli([tmp_path], out=None, interval=1.0, json_out=True) == 2
    assert watch_cli([tmp_path, tmp_path], out=None, interval=1.0, json_out=False) == 2
    assert watch_cli([tmp_path / "missing"], out=None, interval=1.0, json_out=False) == 2

"""The values and lines that used to break the reader (issue 10, item 5), each read
directly and through ``tdiag report``: a clean exit, the problem listed, no NaN finding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_history_reference import assert_reads_like_reference, reference_read

import tdiag.history as history
import tdiag.history.reader as history_reader
from tdiag.history import read_history
from tdiag.report import report_command


def _rows(n: int = 60, **extra) -> list[str]:
    return [
        json.dumps({"step": s, "train/loss": 3.0 - s / 100, "train/lr": 1e-3, **extra})
        for s in range(1, n + 1)
    ]


def _report(run: Path, capsys) -> tuple[int, dict, str]:
    """``tdiag report RUN`` (its command function: an exception would escape it): the exit
    code, report.json and what went to stderr."""
    code = report_command(run, json_out=False, out=None, fail_on=None)
    report = json.loads((run / "report.json").read_text()) if code in (0, 1) else {}
    return code, report, capsys.readouterr().err


BAD_LINES = {
    "huge integer": b'{"step": 61, "train/loss": 2.0, "train/tokens": 1' + b"0" * 400 + b"}",
    "5,000-deep array": b'{"step": 61, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "invalid UTF-8": b'{"step": 61, "tr\xc3in/loss": 2.0, "train/lr": 0.001}',
    "two objects": b'{"step": 61, "train/loss": 2.0}{"step": 62, "train/loss": 2.0}',
    "lone surrogate name": b'{"step": 61, "train/loss": 2.0, "train/\\ud800": 2.0}',
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_a_bad_line_is_counted_and_the_report_goes_on(tmp_path, capsys, name):
    data = "\n".join(_rows()).encode() + b"\n" + BAD_LINES[name] + b"\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.jsonl").write_bytes(data)
    df, stats = read_history(run)
    assert_reads_like_reference(df, stats, reference_read(data))
    assert stats.problems and df["step"].iloc[59] == 60
    code, report, err = _report(run, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert report["history_problems"] == stats.problems
    assert "train.nonfinite-loss" not in {f["id"] for f in report["findings"]}


def test_values_of_an_unknown_shape_are_dropped_not_nan(tmp_path, capsys):
    """{"train/loss": {"mean": 2.1}} for 100 rows once read as 100 NaN losses."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "train/loss": {"mean": 2.1}, "train/lr": 1e-3} for s in range(1, 101)]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, stats = read_history(run)
    assert "train/loss" not in df.columns and df["train/lr"].notna().all()
    assert stats.non_numeric == 100 and stats.non_numeric_keys == {"train/loss": 100}
    assert stats.nonfinite_values == 0
    code, report, err = _report(run, capsys)
    assert code == 0, err
    assert "train.nonfinite-loss" not in {f["id"] for f in report["findings"]}
    assert any("100 value(s) were not numbers" in p for p in report["history_problems"])


def test_dropped_values_are_told_apart_from_logged_nans(tmp_path):
    """Where a column also holds numbers, the dropped cells read as missing and are listed
    in ``dropped_rows``; a logged NaN is counted as non-finite and is not listed."""
    path = tmp_path / "history.jsonl"
    rows = [{"step": s, "train/loss": 2.0, "train/lr": 1e-3} for s in range(1, 11)]
    rows[3]["train/loss"] = {"mean": 2.1}
    rows[5]["train/loss"] = [2.1]
    rows[7]["train/loss"] = "NaN"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, stats = read_history(path)
    assert stats.dropped_rows["train/loss"].tolist() == [3, 5]
    assert stats.non_numeric == 2 and stats.nonfinite_values == 1
    assert np.isnan(df["train/loss"].to_numpy()[[3, 5, 7]]).all()


def test_the_rules_skip_dropped_cells_but_find_a_logged_nan(tmp_path):
    """The frame carries ``ReadStats.dropped_rows`` (``attrs[DROPPED_ATTR]``); the loss
    rule skips those cells, and still finds a NaN that was written as one (the case with
    the bug and the one without, on the same history)."""
    from tdiag.report.rules import evaluate

    rows = [{"step": s, "train/loss": 3.0 - s / 100, "train/lr": 1e-3} for s in range(1, 101)]
    for r in rows[9::10]:
        r["train/loss"] = {"mean": 2.1}
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, _ = read_history(path)
    assert df.attrs[history.DROPPED_ATTR] == {"train/loss": tuple(range(9, 100, 10))}
    assert "train.nonfinite-loss" not in {f.id for f in evaluate(df, {}, []).findings}
    rows[20]["train/loss"] = "NaN"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, _ = read_history(path)
    found = [f for f in evaluate(df, {}, []).findings if f.id == "train.nonfinite-loss"]
    assert len(found) == 1 and found[0].step == 21


def test_the_report_finds_no_nan_loss_where_values_were_dropped(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "train/loss": 3.0 - s / 100, "train/lr": 1e-3} for s in range(1, 101)]
    for r in rows[9::10]:
        r["train/loss"] = {"mean": 2.1}
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, report, err = _report(run, capsys)
    assert code == 0, err
    assert "train.nonfinite-loss" not in {f["id"] for f in report["findings"]}


@pytest.mark.parametrize("neighbour", ["clean", "garbage", "brace in a string"])
def test_two_objects_on_a_line_are_garbage_whatever_the_neighbours(tmp_path, neighbour):
    """Each line is judged alone: the block it falls in changes nothing."""
    extra = {"clean": [], "garbage": ["%%"], "brace in a string": ['{"step": 0, "n": "}{"}']}
    fooling = [  # the lines a block-wise parse joined into plausible rows
        '{"step": 61, "train/loss": 1.0},{"step": 62, "train/loss": 1.0}',
        '{"step": 63, "a": [{"b": 1}',
        '{"c": 2}], "train/loss": 1.0}',
    ]
    text = "\n".join([*_rows(), *fooling, *extra[neighbour], *_rows(2)]) + "\n"
    path = tmp_path / "history.jsonl"
    path.write_text(text)
    for block in (1 << 22, 97):
        saved, history_reader._BLOCK_BYTES = history_reader._BLOCK_BYTES, block
        try:
            df, stats = read_history(path, dedupe_resumed=False)
        finally:
            history_reader._BLOCK_BYTES = saved
        assert_reads_like_reference(df, stats, reference_read(text.encode(), dedupe_resumed=False))
        assert stats.garbage_line_numbers[:3] == [61, 62, 63]


def test_nan_and_infinities_round_trip_as_strict_json(tmp_path):
    path = tmp_path / "history.jsonl"
    with history.HistoryWriter(path) as w:
        w.write({"step": 1, "a": math.nan, "b": math.inf, "c": -math.inf, "d": 1e-310})
    line = path.read_text()
    assert '"a":"NaN"' in line and '"b":"Infinity"' in line and '"c":"-Infinity"' in line
    json.loads(line, parse_constant=lambda t: pytest.fail(f"bare {t}"))
    df, stats = read_history(path)
    assert math.isnan(df["a"][0]) and df["b"][0] == math.inf and df["c"][0] == -math.inf
    assert df["d"][0] == 1e-310 and stats.nonfinite_values == 3


def test_the_loss_chart_draws_no_nan_mark_where_values_were_dropped(tmp_path):
    """The chart side of the same rule: a dropped cell is a gap in the loss line, a logged
    NaN a point (``logged_mask``, shared by the charts and the rules)."""
    from tdiag.report.charts import build_charts
    from tdiag.report.summary import logged_mask

    rows = [{"step": s, "train/loss": 3.0 - s / 100, "train/lr": 1e-3} for s in range(1, 41)]
    for r in rows[9::10]:
        r["train/loss"] = {"mean": 2.1}
    rows[4]["train/loss"] = "NaN"
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, _ = read_history(path)
    logged = logged_mask(df, "train/loss")
    assert not logged[[9, 19, 29, 39]].any()  # dropped: not logged
    assert logged[4]  # the logged NaN stays a logged point
    (loss,) = build_charts(df, only=["loss"])
    (marks,) = loss.spec["nonfinite"]
    assert list(marks["steps"]) == [5]  # the logged NaN, and no mark at 10, 20, 30, 40
    drawn = set(np.asarray(loss.spec["x"]["step"]).tolist())
    assert {10, 20, 30, 40}.isdisjoint(drawn) and len(drawn) == 35

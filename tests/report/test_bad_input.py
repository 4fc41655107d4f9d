"""Bad run folders: a report still comes out, with the problems counted and stated;
exit code 2 only when nothing can be read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tdiag.report import report_command


def lines(n: int, start: int = 1, **extra) -> list[str]:
    return [
        json.dumps({"step": s, "train/loss": 2.0 + 1.0 / s, "train/lr": 1e-3, **extra})
        for s in range(start, start + n)
    ]


def run_report(tmp_path, text: str, capsys=None, *, meta: str | None = None):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "history.jsonl").write_text(text)
    if meta is not None:
        (run / "meta.json").write_text(meta)
    code = report_command(run, json_out=False, out=None, fail_on=None)
    report = (
        json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else None
    )
    html = (run / "report.html").read_text() if (run / "report.html").exists() else ""
    return code, report, html


@pytest.mark.parametrize("text", ["", "\n\n", "garbage\nnot json either\n", '{"loss": 1}\n[1,2]\n'])
def test_nothing_readable_exits_2_with_a_message(tmp_path, capsys, text):
    code, report, _ = run_report(tmp_path, text)
    assert code == 2 and report is None
    err = capsys.readouterr().err
    assert "cannot read the run" in err and "no readable row" in err


def test_missing_history_exits_2(tmp_path, capsys):
    (tmp_path / "meta.json").write_text("{}")
    assert report_command(tmp_path, json_out=True, out=None, fail_on=None) == 2
    assert "no history file" in capsys.readouterr().err


def test_truncated_last_line(tmp_path):
    text = "\n".join(lines(30)) + '\n{"step": 31, "train/lo'
    code, report, html = run_report(tmp_path, text)
    assert code == 0
    assert report["summary"]["rows"] == 30 and report["summary"]["steps"] == 30
    assert any("cut off" in p for p in report["history_problems"])
    assert report["history_read"]["torn_last_line"] is True
    assert "1 problem reading the history" in html and "cut off" in html


def test_garbage_lines_are_counted_and_stated(tmp_path):
    good = lines(40)
    text = "\n".join([*good[:10], "%%%garbage", *good[10:20], "[1, 2, 3]", "", *good[20:]]) + "\n"
    code, report, html = run_report(tmp_path, text)
    assert code == 0 and report["summary"]["rows"] == 40
    assert report["history_read"]["garbage"] == 2 and report["history_read"]["blank"] == 1
    problem = next(p for p in report["history_problems"] if "not valid JSON" in p)
    assert problem.startswith("2 line(s)") and "11" in problem and "22" in problem  # line numbers
    assert "not valid JSON" in html


def test_missing_metrics_give_a_partial_report(tmp_path):
    text = "\n".join(json.dumps({"step": s, "sys/rss_gb": 1.0 + s / 100}) for s in range(50)) + "\n"
    code, report, html = run_report(tmp_path, text)
    assert code == 0
    summary = report["summary"]
    assert summary["final_train_loss"] is None and summary["mean_tokens_per_sec"] is None
    assert summary["peak_rss_gb"] == pytest.approx(1.49)
    assert report["skipped"], "rules without their metrics must say they were skipped"
    assert 'id="chart-memory"' in html and 'id="chart-loss"' not in html


def test_resumed_run_with_steps_going_back(tmp_path):
    text = "\n".join([*lines(60), *lines(30, start=41)]) + "\n"  # resumed from a step-40 checkpoint
    code, report, html = run_report(tmp_path, text)
    assert code == 0
    assert report["history_read"]["non_monotonic"] == 1
    assert any("resumed run" in p for p in report["history_problems"])
    assert report["summary"]["last_step"] == 70 and report["summary"]["rows"] == 70
    assert "resumed run" in html


def test_nan_and_inf_values(tmp_path):
    rows = lines(40)
    rows[20] = '{"step": 21, "train/loss": NaN, "train/lr": 0.001}'  # Python json's bare token
    rows[30] = '{"step": 31, "train/loss": "Infinity", "train/lr": 0.001}'  # our strict encoding
    code, report, html = run_report(tmp_path, "\n".join(rows) + "\n")
    assert code == 0
    assert report["history_read"]["nonfinite_values"] == 2
    # NaN values are data, not a problem reading the file: in the summary, not the problems
    assert not any("non-finite" in p for p in report["history_problems"])
    assert report["summary"]["nonfinite_values"] == 2
    assert math.isfinite(report["summary"]["best_train_loss"])
    ids = {f["id"] for f in report["findings"]}
    assert "train.nonfinite-loss" in ids
    assert 'id="chart-loss"' in html


def test_one_row_history(tmp_path):
    code, report, html = run_report(tmp_path, lines(1)[0] + "\n")
    assert code == 0
    assert report["summary"]["rows"] == 1 and report["summary"]["final_train_loss"] == 3.0
    assert report["summary"]["wall_time_s"] is None
    assert "No finding" in html or report["findings"]


def test_unreadable_meta_is_stated_not_fatal(tmp_path):
    code, report, html = run_report(tmp_path, "\n".join(lines(20)) + "\n", meta="{not json")
    assert code == 0 and report["run"] == {}
    assert any("meta.json could not be read" in p for p in report["history_problems"])
    assert "meta.json could not be read" in html


def test_bad_events_are_skipped_and_counted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = {"id": "monitor.nonfinite", "severity": "error", "title": "NaN at step 3", "step": 3}
    (run / "events.jsonl").write_text(json.dumps(good) + '\n{"id": "x"}\ntorn{\n')
    code, report, html = run_report(tmp_path, "\n".join(lines(20)) + "\n")
    assert code == 0
    assert [a["id"] for a in report["live_alerts"]] == ["monitor.nonfinite"]
    assert any("events.jsonl were not Findings" in p for p in report["history_problems"])
    assert "1 live alert raised while training" in html and "NaN at step 3" in html


# ---------------------------------------------------------------- the block reader


def naive_read(text: str):
    """Line-by-line reference of the tolerant reader (Contract 3), without dedupe."""
    nonfinite = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    rows, garbage = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=lambda t: nonfinite[t])
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            garbage += 1
            continue
        step = obj.get("step")
        step = nonfinite.get(step) if isinstance(step, str) else step
        if not isinstance(step, int | float) or not math.isfinite(step):
            continue
        row = {"step": int(step)}
        for k, v in obj.items():
            if k != "step":
                row[k] = nonfinite.get(v, v) if isinstance(v, str) else float(v)
        rows.append(row)
    return rows, garbage


def messy_history(rng) -> str:
    out = []
    for s in range(rng.randint(1, 120)):
        r = rng.random()
        if r < 0.05:
            out.append(rng.choice(["%%", "[1,2]", "", '{"a": 1', "null", '"str"']))
            continue
        row = {"step": s if rng.random() > 0.03 else rng.choice(["NaN", "x", None, 2.5])}
        for name in ("train/loss", "train/lr", "val/loss", "note"):
            if rng.random() < 0.7:
                row[name] = (
                    rng.choice([rng.random(), "NaN", "Infinity", -1, True])
                    if name != "note"
                    else "hi"
                )
        out.append(json.dumps(row))
    text = "\n".join(out)
    return text if rng.random() < 0.3 else text + "\n"


@pytest.mark.parametrize("seed", range(12))
def test_block_reader_matches_a_line_by_line_reference(tmp_path, monkeypatch, seed):
    import random

    import numpy as np

    import tdiag.history.reader as history
    from tdiag.history import HistoryReadError, read_history

    monkeypatch.setattr(history, "_BLOCK_BYTES", 300)  # many blocks, some with bad lines
    text = messy_history(random.Random(seed))
    path = tmp_path / "history.jsonl"
    path.write_text(text)
    rows, garbage = naive_read(text)
    if not rows:
        with pytest.raises(HistoryReadError):
            read_history(path, dedupe_resumed=False)
        return
    df, stats = read_history(path, dedupe_resumed=False)
    assert stats.rows == len(rows) and stats.garbage == garbage
    assert df["step"].tolist() == [r["step"] for r in rows]
    for name in ("train/loss", "train/lr", "val/loss"):
        expected = np.array([r.get(name, np.nan) for r in rows], dtype=float)
        if name in df.columns:
            np.testing.assert_array_equal(df[name].to_numpy(dtype=float), expected)
        else:
            assert np.isnan(expected).all()
    if "note" in df.columns:
        assert [v for v in df["note"] if isinstance(v, str)] == [
            r["note"] for r in rows if "note" in r
        ]


def test_a_folder_of_runs_names_them(tmp_path, capsys):
    for name in ("run-a", "run-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "history.jsonl").write_text("\n".join(lines(5)) + "\n")
    assert report_command(tmp_path, json_out=False, out=None, fail_on=None) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "2 run folder(s) below it" in err and "run-a" in err and "run-b" in err


def test_one_row_says_there_is_too_little_to_judge(tmp_path, capsys):
    code, report, html = run_report(tmp_path, lines(1)[0] + "\n")
    assert code == 0 and len(report["skipped"]) >= 9
    assert "No finding, but" in html and '<details class="skipped" id="skipped" open>' in html
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped for lack of data (metrics not logged or too few points)" in out
    fixture = Path(__file__).parent / "fixtures" / "healthy"
    report_command(fixture, json_out=True, out=tmp_path / "healthy", fail_on=None)
    html = (tmp_path / "healthy" / "report.html").read_text()
    assert "No finding: nothing" in html and "No finding, but" not in html
    assert '<details class="skipped" id="skipped">' in html


def test_a_nan_validation_loss_on_its_own_row_is_the_final_one(tmp_path):
    rows = [*lines(20), '{"step": 20, "val/loss": 2.5}', *lines(20, start=21)]
    rows.append('{"step": 40, "val/loss": "NaN"}')  # the Monitor's own row for an eval
    code, report, _ = run_report(tmp_path, "\n".join(rows) + "\n")
    assert code == 0
    assert report["summary"]["final_val_loss"] == "NaN"  # not the last finite one
    assert report["summary"]["best_val_loss"] == 2.5

import json
import math

import pytest

from tdiag.history import (
    HistoryReadError,
    HistoryWriter,
    read_events,
    read_history,
    write_json_atomic,
)


def test_writer_lines_are_strict_json_and_read_back(tmp_path):
    path = tmp_path / "history.jsonl"
    with HistoryWriter(path) as w:
        w.write({"step": 0, "time": 1.0, "train/loss": 2.5})
        w.write({"step": 1, "train/loss": math.nan, "train/grad_norm": math.inf})
        w.write({"step": 1, "val/loss": 3.0})
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda t: pytest.fail(f"bare {t} token"))
    df, stats = read_history(tmp_path)
    assert list(df["step"]) == [0, 1, 1]
    assert df["train/loss"].iloc[0] == 2.5 and math.isnan(df["train/loss"].iloc[1])
    assert df["train/grad_norm"].iloc[1] == math.inf
    assert math.isnan(df["val/loss"].iloc[0]) and df["val/loss"].iloc[2] == 3.0
    assert stats.rows == 3 and stats.nonfinite_values == 2 and stats.garbage == 0


def test_writer_requires_step(tmp_path):
    with HistoryWriter(tmp_path / "h.jsonl") as w, pytest.raises(ValueError, match="step"):
        w.write({"train/loss": 1.0})


def test_reader_tolerates_bare_tokens_garbage_and_torn_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(
        '{"step": 0, "train/loss": NaN}\n'
        "garbage here\n"
        "\n"
        "[1, 2]\n"
        '{"train/loss": 1}\n'
        '{"step": 1, "train/loss": Infinity, "note": "hi"}\n'
        '{"step": 2, "train/lo'
    )
    df, stats = read_history(path)
    assert list(df["step"]) == [0, 1]
    assert math.isnan(df["train/loss"].iloc[0]) and df["train/loss"].iloc[1] == math.inf
    assert df["note"].iloc[1] == "hi"
    assert stats.torn_last_line and stats.garbage == 3 and stats.no_step == 1 and stats.blank == 1
    text = " ".join(stats.problems)
    assert "cut off" in text and "not valid JSON" in text and "no numeric 'step'" in text


def test_reader_resumed_run_keeps_latest_values(tmp_path):
    path = tmp_path / "history.jsonl"
    rows = [{"step": s, "train/loss": 10.0 - s} for s in range(5)]
    rows += [{"step": s, "train/loss": 100.0 + s} for s in range(3, 7)]  # resumed at 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, stats = read_history(path)
    assert stats.non_monotonic == 1
    assert list(df["step"]) == list(range(7))
    assert df.set_index("step").loc[3, "train/loss"] == 103.0
    assert df.set_index("step").loc[2, "train/loss"] == 8.0
    assert stats.superseded == 2 and "2 earlier row(s)" in " ".join(stats.problems)


def test_reader_resume_keeps_new_nan_and_same_step_val_rows(tmp_path):
    path = tmp_path / "history.jsonl"
    rows = [
        {"step": 1, "train/loss": 5.0, "train/lr": 1.0},
        {"step": 2, "train/loss": 4.0, "train/lr": 1.0},
        {"step": 2, "val/loss": 4.5},
        {"step": 3, "train/loss": 3.0},
        # resumed from step 2: its step-2 row has a NaN loss and no lr
        {"step": 2, "train/loss": "NaN"},
        {"step": 2, "val/loss": 9.0},
        {"step": 3, "train/loss": 2.0},
        # resumed again from 1
        {"step": 1, "train/loss": 7.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, stats = read_history(path)
    assert stats.non_monotonic == 2
    assert df.to_dict("list")["step"] == [1]
    assert df["train/loss"].tolist() == [7.0]
    rows = rows[:-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, _ = read_history(path)
    assert df["step"].tolist() == [1, 2, 2, 3]
    assert math.isnan(df["train/loss"].iloc[1])  # the resumed NaN is not back-filled
    assert math.isnan(df["train/lr"].iloc[1])
    assert df["val/loss"].iloc[2] == 9.0 and df["train/loss"].iloc[3] == 2.0


def test_reader_errors_when_nothing_readable(tmp_path):
    with pytest.raises(HistoryReadError, match="no history file"):
        read_history(tmp_path)
    (tmp_path / "history.jsonl").write_text("")
    with pytest.raises(HistoryReadError, match="no readable row"):
        read_history(tmp_path)


def test_atomic_json_and_events(tmp_path):
    write_json_atomic(tmp_path / "meta.json", {"x": math.nan})
    assert json.loads((tmp_path / "meta.json").read_text()) == {"x": "NaN"}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temp file left
    (tmp_path / "events.jsonl").write_text('{"id": "a", "v": "Infinity"}\nbroken\n')
    assert read_events(tmp_path) == [{"id": "a", "v": math.inf}]

import json
import math

import pytest

from tdiag.history import (
    HISTORY_SCHEMA,
    SCHEMA_KEY,
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


def test_writer_stamps_the_format_on_its_first_row_only(tmp_path):
    path = tmp_path / "history.jsonl"
    for start in (1, 3):  # a run, then its resumption: each writer states the format once
        with HistoryWriter(path) as w:
            w.write({"step": start, "train/loss": 1.0})
            w.write({"step": start + 1, "train/loss": 2.0, SCHEMA_KEY: 7})  # reserved: dropped
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get(SCHEMA_KEY) for r in rows] == [HISTORY_SCHEMA, None, HISTORY_SCHEMA, None]
    assert list(rows[0]) == ["step", "train/loss", SCHEMA_KEY]  # step stays first
    df, stats = read_history(path)
    assert list(df.columns) == ["step", "train/loss"] and stats.schema == 1
    assert not stats.problems


def test_writer_after_a_torn_last_line_keeps_its_first_row(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')  # disk was full
    with HistoryWriter(path) as w:
        assert path.read_bytes().endswith(b"lo")  # nothing written before the first row
        w.write({"step": 2, "train/loss": 2.0})
        w.write({"step": 3, "train/loss": 3.0})
    df, stats = read_history(path)
    assert df["step"].tolist() == [1, 2, 3] and df["train/loss"].tolist() == [1.0, 2.0, 3.0]
    assert stats.garbage == 1 and stats.garbage_line_numbers == [2] and not stats.torn_last_line
    with HistoryWriter(path) as w:  # a file that ends with its newline gets none added
        w.write({"step": 4})
    assert b"\n\n" not in path.read_bytes()


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
    assert "note" not in df.columns  # a string is not a number: dropped, counted
    assert stats.non_numeric == 1 and stats.non_numeric_keys == {"note": 1}
    assert stats.torn_last_line and stats.garbage == 3 and stats.no_step == 1 and stats.blank == 1
    assert stats.nonfinite_values == 2
    text = " ".join(stats.problems)
    assert "cut off" in text and "not valid JSON" in text and "no numeric 'step'" in text
    assert "1 value(s) were not numbers and were dropped (note: 1)" in stats.problems


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
    (tmp_path / "events.jsonl").write_bytes(
        b'{"id": "a", "v": "Infinity"}\nbroken\n{"id": "b\xff"}\n'
        b'{"id": "c", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"  # RecursionError: skipped
    )
    assert [e["id"] for e in read_events(tmp_path)] == ["a"]  # not UTF-8, too deep: skipped
    assert read_events(tmp_path)[0] == {"id": "a", "v": math.inf}


@pytest.mark.parametrize("fast", [True, False], ids=["orjson", "json"])
def test_plain_rows_read_back_exactly_whichever_encoder(tmp_path, monkeypatch, fast):
    """The writer's fast path (orjson, for rows of plain finite values) and the json path
    give the same values back, bit for bit; what orjson refuses falls back to json."""
    import random
    import struct

    import tdiag.history.writer as writer

    if fast:
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(writer, "_fast_dumps", None)
    rng = random.Random(7)
    rows = []
    for step in range(1, 301):
        bits = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        row = {
            "step": step,
            "time": 1.7e9 + step / 3,
            "a": rng.random() * 10 ** rng.randint(-300, 300),
        }
        row["bits"] = bits if math.isfinite(bits) else 0.5
        row.update({"neg0": -0.0, "tiny": 5e-324, "big": 1.7976931348623157e308, "n": 2**63 - 1})
        row["é/名"] = float(step)  # raw UTF-8 with orjson, \u escapes with json
        rows.append(row)
    rows.append({"step": 301, "huge": 2**70})  # beyond 64 bits: orjson refuses, json writes it
    rows.append({"step": 302, "bad\ud800": 1.0, "ok": 2.0})  # a lone surrogate: json only
    path = tmp_path / "history.jsonl"
    with HistoryWriter(path) as w:
        for r in rows:
            w.write(r)
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == len(rows) + 1 and lines[-1] == b""
    back = [json.loads(x) for x in lines[:-1]]
    for r, b in zip(rows[:300], back, strict=False):
        b.pop(SCHEMA_KEY, None)
        assert b == r
        assert all(
            struct.pack("<d", b[k]) == struct.pack("<d", r[k]) for k in ("a", "bits", "neg0")
        )
    assert back[300]["huge"] == 2**70 and back[301]["ok"] == 2.0
    df, stats = read_history(path)
    assert df["é/名"].iloc[:300].tolist() == [float(s) for s in range(1, 301)]
    assert stats.bad_keys == 1 and not stats.non_numeric  # the surrogate name is dropped
    assert df["huge"].iloc[300] == float(2**70)

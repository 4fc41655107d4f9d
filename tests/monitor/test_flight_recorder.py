"""The flight recorder's ring buffer and its file."""

from __future__ import annotations

import json

import pytest

from tdiag.monitor import FLIGHT_RECORDER_FILE, FlightRecorder


def test_ring_keeps_the_last_rows_and_merges_a_step(tmp_path):
    rec = FlightRecorder(3)
    for step in range(1, 6):
        rec.record(step, {"train/loss": float(step)})
    rec.record(5, {"val/loss": 0.5})
    assert [r["step"] for r in rec.rows()] == [3, 4, 5]
    assert rec.rows()[-1] == {"step": 5, "train/loss": 5.0, "val/loss": 0.5}


def test_dump_is_strict_json_with_a_header(tmp_path):
    rec = FlightRecorder(10)
    rec.record(1, {"train/loss": 2.0})
    rec.record(2, {"train/loss": float("nan"), "train/grad_norm": float("inf")})
    path = rec.dump(tmp_path, reason="train.nonfinite-loss", step=2, detail="x")
    assert path == tmp_path / FLIGHT_RECORDER_FILE

    def reject(token):
        raise ValueError(token)

    lines = [json.loads(x, parse_constant=reject) for x in path.read_text().splitlines()]
    head = lines[0]["flight_recorder"]
    assert head["reason"] == "train.nonfinite-loss" and head["step"] == 2 and head["rows"] == 2
    assert lines[2] == {"step": 2, "train/loss": "NaN", "train/grad_norm": "Infinity"}
    rec.record(3, {"train/loss": 1.0})
    rec.dump(tmp_path, reason="exception", step=3)  # rewritten, not appended
    assert len(path.read_text().splitlines()) == 4


def test_disabled_recorder_writes_nothing(tmp_path):
    rec = FlightRecorder(0)
    rec.record(1, {"a": 1.0})
    assert len(rec) == 0 and rec.dump(tmp_path, reason="exception", step=1) is None
    assert not (tmp_path / FLIGHT_RECORDER_FILE).exists()
    with pytest.raises(ValueError, match="-1"):
        FlightRecorder(-1)


def test_state_round_trip():
    rec = FlightRecorder(4)
    for step in range(1, 4):
        rec.record(step, {"train/loss": step / 2})
    other = FlightRecorder(4)
    other.load_state_dict(rec.state_dict())
    assert other.rows() == rec.rows()

"""Sink protocol, NullSink, MultiSink failure isolation, and the history/events sink."""

from __future__ import annotations

import errno
import json
import logging
import math
import os

import pytest

from tdiag.findings import Finding, Severity
from tdiag.history import read_events, read_history
from tdiag.monitor.sinks import (
    ConsoleSink,
    JsonlSink,
    MultiSink,
    NullSink,
    Sink,
    SinkUnavailable,
    TensorBoardSink,
    WandbSink,
)


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def open(self, run_dir, meta):
        self.calls.append(("open", run_dir))

    def write(self, step, metrics):
        self.calls.append(("write", step, dict(metrics)))

    def event(self, finding):
        self.calls.append(("event", finding.id))

    def close(self):
        self.calls.append(("close",))


class FailingSink(RecordingSink):
    """Raises ``exc`` from the method named ``phase``."""

    def __init__(self, phase: str, exc: BaseException) -> None:
        super().__init__()
        self.phase = phase
        self.exc = exc

    def _maybe_fail(self, name):
        if name == self.phase:
            raise self.exc

    def open(self, run_dir, meta):
        super().open(run_dir, meta)
        self._maybe_fail("open")

    def write(self, step, metrics):
        super().write(step, metrics)
        self._maybe_fail("write")

    def event(self, finding):
        super().event(finding)
        self._maybe_fail("event")


def _finding(step: int = 3, severity: Severity = Severity.ERROR) -> Finding:
    return Finding(
        id="train.nonfinite_loss",
        severity=severity,
        title="Loss became NaN",
        message="the loss was NaN at step 3",
        step=step,
        evidence={"loss": math.nan},
    )


def test_every_sink_follows_the_protocol():
    for sink in (
        NullSink(),
        JsonlSink(),
        TensorBoardSink(),
        WandbSink(),
        ConsoleSink(),
        MultiSink(),
    ):
        assert isinstance(sink, Sink)


def test_null_sink_does_nothing(tmp_path):
    sink = NullSink()
    sink.open(tmp_path, {})
    sink.write(1, {"train/loss": 1.0})
    sink.event(_finding())
    sink.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("phase", ["open", "write", "event"])
def test_multisink_disables_a_failing_sink_and_logs_once(tmp_path, caplog, phase):
    bad = FailingSink(phase, OSError(errno.ENOSPC, "No space left on device"))
    good = RecordingSink()
    multi = MultiSink([bad, None, good])
    with caplog.at_level(logging.WARNING, logger="tdiag.monitor.sinks.base"):
        multi.open(tmp_path, {})
        for step in (1, 2, 3):
            multi.write(step, {"train/loss": 1.0})
            multi.event(_finding(step))
        multi.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "FailingSink" in text and phase in text and "No space left" in text
    assert "training" in text
    # The good sink got everything, the bad one nothing after its failure.
    assert [c[0] for c in good.calls] == ["open"] + ["write", "event"] * 3 + ["close"]
    bad_phases = [c[0] for c in bad.calls]
    assert bad_phases.count(phase) == 1
    assert bad_phases[-1] == "close"  # still closed once, best effort
    assert multi.active == [good]
    assert [f.to_dict() for f in multi.failures] == [
        {
            "sink": "FailingSink",
            "phase": phase,
            "error": "OSError: [Errno 28] No space left on device",
        }
    ]


def test_multisink_reports_unavailable_sink_with_its_message_only(tmp_path, caplog):
    bad = FailingSink("open", SinkUnavailable("install tdiag[wandb]"))
    multi = MultiSink([bad])
    with caplog.at_level(logging.DEBUG, logger="tdiag.monitor.sinks.base"):
        multi.open(tmp_path, {})
        multi.write(1, {"a": 1.0})
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "install tdiag[wandb]" in warning.getMessage()
    assert warning.exc_info is None  # no traceback at warning level
    assert multi.failures[0].error == "install tdiag[wandb]"


def test_multisink_does_not_swallow_keyboard_interrupt(tmp_path):
    multi = MultiSink([FailingSink("write", KeyboardInterrupt())])
    multi.open(tmp_path, {})
    with pytest.raises(KeyboardInterrupt):
        multi.write(1, {})


def test_multisink_close_is_idempotent_and_isolated(tmp_path):
    class BadClose(RecordingSink):
        def close(self):
            super().close()
            raise RuntimeError("boom")

    bad, good = BadClose(), RecordingSink()
    multi = MultiSink([bad, good])
    multi.open(tmp_path, {})
    multi.close()
    multi.close()
    assert good.calls.count(("close",)) == 1
    assert bad.calls.count(("close",)) == 1
    assert multi.failures[0].phase == "close"


# ---- JsonlSink ---------------------------------------------------------------------------


def test_jsonl_rows_are_strict_json_with_step_time_and_metrics(tmp_path):
    sink = JsonlSink(clock=lambda: 1764374400.5)
    sink.open(tmp_path, {"config": {}})
    sink.write(10, {"train/loss": 2.5, "train/lr": 3e-4})
    sink.write(20, {"train/loss": math.nan, "train/grad_norm": math.inf, "x": -math.inf})
    sink.write(20, {"val/loss": 2.25})
    sink.close()
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) for line in lines]
    assert strict[0] == {
        "step": 10,
        "time": 1764374400.5,
        "train/loss": 2.5,
        "train/lr": 3e-4,
        "tdiag_history": 1,  # the format version, on a writer's first row (tdiag/history.py)
    }
    assert strict[1]["train/loss"] == "NaN"
    assert strict[1]["train/grad_norm"] == "Infinity"
    assert strict[1]["x"] == "-Infinity"
    assert list(strict[0]) == ["step", "time", "train/loss", "train/lr", "tdiag_history"]
    df, stats = read_history(tmp_path)
    assert stats.problems == ["3 non-finite value(s) (NaN/Inf)"]
    assert df["step"].tolist() == [10, 20, 20]
    assert math.isnan(df["train/loss"][1]) and df["val/loss"][2] == 2.25


def test_jsonl_history_is_readable_while_written(tmp_path):
    sink = JsonlSink()
    sink.open(tmp_path, {})
    sink.write(1, {"train/loss": 3.0})
    df, _ = read_history(tmp_path / "history.jsonl")  # no close(): flushed per line
    assert df["train/loss"].tolist() == [3.0]
    sink.write(2, {"train/loss": 2.0})
    df, _ = read_history(tmp_path)
    assert df["train/loss"].tolist() == [3.0, 2.0]
    sink.close()


def test_jsonl_appends_on_resume(tmp_path):
    for step in (1, 2):
        sink = JsonlSink()
        sink.open(tmp_path, {})
        sink.write(step, {"train/loss": float(step)})
        sink.close()
    df, _ = read_history(tmp_path)
    assert df["step"].tolist() == [1, 2]


def test_jsonl_events_round_trip_findings(tmp_path):
    sink = JsonlSink()
    sink.open(tmp_path, {})
    assert not (tmp_path / "events.jsonl").exists()  # no empty file for a clean run
    first = _finding(3)
    second = Finding(id="perf.slow", severity="warning", title="slow", where="blocks.0.mlp", step=7)
    sink.event(first)
    sink.event(second)
    # readable before close
    events = read_events(tmp_path)
    sink.close()
    assert [Finding.from_dict(e) for e in events][1] == second
    back = Finding.from_dict(events[0])
    assert back.id == first.id and back.step == 3 and math.isnan(back.evidence["loss"])
    for line in (tmp_path / "events.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))


def test_jsonl_events_after_a_torn_last_line_start_on_a_new_line(tmp_path):
    """A crash (or a full disk) left events.jsonl ending mid-line: the resumed run's first
    Finding is not glued to the fragment; only the fragment is lost."""
    whole = json.dumps(_finding(2).to_dict(), allow_nan=False)
    torn = json.dumps(_finding(5).to_dict(), allow_nan=False)[:37]  # cut mid-object
    (tmp_path / "events.jsonl").write_text(whole + "\n" + torn)
    sink = JsonlSink()
    sink.open(tmp_path, {})
    sink.event(_finding(9))
    sink.event(_finding(10))
    sink.close()
    lines = (tmp_path / "events.jsonl").read_text().split("\n")
    assert lines[:2] == [whole, torn] and lines[-1] == ""
    assert [e["step"] for e in read_events(tmp_path)] == [2, 9, 10]


def test_jsonl_events_on_an_intact_file_add_no_blank_line(tmp_path):
    (tmp_path / "events.jsonl").write_text(json.dumps(_finding(2).to_dict()) + "\n")
    sink = JsonlSink()
    sink.open(tmp_path, {})
    sink.event(_finding(9))
    sink.close()
    text = (tmp_path / "events.jsonl").read_text()
    assert "\n\n" not in text and text.count("\n") == 2


def test_jsonl_on_a_full_disk_is_disabled_and_training_goes_on(tmp_path, caplog):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    (tmp_path / "history.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    good = RecordingSink()
    multi = MultiSink([JsonlSink(), good])
    with caplog.at_level(logging.WARNING):
        multi.open(tmp_path, {})
        for step in range(5):
            multi.write(step, {"train/loss": 1.0})
        multi.close()
    assert len(good.calls) == 7
    assert len(multi.failures) == 1
    assert multi.failures[0].sink == "JsonlSink" and "No space left" in multi.failures[0].error
    assert sum("JsonlSink" in r.getMessage() for r in caplog.records) == 1


def test_jsonl_write_before_open_raises():
    with pytest.raises(RuntimeError, match="before open"):
        JsonlSink().write(1, {})


def test_jsonl_passes_non_float_values_through(tmp_path):
    # Non-float values (ints, bools, strings) pass through as JSON.
    sink = JsonlSink()
    sink.open(tmp_path, {})
    sink.write(1, {"n": 3, "flag": True, "note": "resumed"})
    sink.close()
    row = json.loads((tmp_path / "history.jsonl").read_text())
    assert row["n"] == 3 and row["flag"] is True and row["note"] == "resumed"


def test_jsonl_step_argument_wins_over_a_step_metric(tmp_path):
    sink = JsonlSink(clock=lambda: 5.0)
    sink.open(tmp_path, {})
    sink.write(7, {"step": 99, "train/loss": 1.0})
    sink.close()
    assert json.loads((tmp_path / "history.jsonl").read_text()) == {
        "step": 7,
        "time": 5.0,
        "train/loss": 1.0,
        "tdiag_history": 1,
    }

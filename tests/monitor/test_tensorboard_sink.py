"""TensorBoardSink: scalars and Findings read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import logging
import math
import os
import threading

import numpy as np
import pytest

from tdiag.findings import Finding
from tdiag.monitor.sinks import MultiSink, TensorBoardSink

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _load(log_dir):
    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def test_scalars_and_findings_read_back(tmp_path):
    sink = TensorBoardSink()
    sink.open(tmp_path, {"config": {"lr": 3e-4}})
    steps = [10, 20, 30]
    for i, step in enumerate(steps):
        sink.write(step, {"train/loss": 3.0 - i, "train/lr": 1e-3 * (i + 1), "note": "skipped"})
    sink.write(30, {"val/loss": np.float32(2.5), "bad": math.nan, "flag": True})
    sink.event(
        Finding(
            id="train.nonfinite_loss",
            severity="error",
            title="Loss became NaN",
            message="at step 30",
            where="blocks.0.attn",
            step=30,
            recommendation="lower the LR",
        )
    )
    sink.close()

    assert sink.log_dir == tmp_path / "tensorboard"
    assert list(sink.log_dir.glob("events.out.tfevents.*"))
    acc = _load(sink.log_dir)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr", "val/loss", "bad"}
    assert tags["histograms"] == []  # scalars only
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == steps
    assert [e.value for e in loss] == pytest.approx([3.0, 2.0, 1.0])
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(30, 2.5)]
    assert math.isnan(acc.Scalars("bad")[0].value)

    # add_text stores text as tensors tagged "<tag>/text_summary"
    assert set(tags["tensors"]) == {"tdiag/findings/text_summary", "tdiag/meta/text_summary"}
    (finding,) = acc.Tensors("tdiag/findings/text_summary")
    text = finding.tensor_proto.string_val[0].decode()
    assert finding.step == 30
    assert "**ERROR** `train.nonfinite_loss`: Loss became NaN at `blocks.0.attn`" in text
    assert "lower the LR" in text
    meta = acc.Tensors("tdiag/meta/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.0003' in meta


def test_write_before_open_raises_and_multisink_isolates_it(tmp_path):
    sink = TensorBoardSink()
    with pytest.raises(RuntimeError, match="before open"):
        sink.write(1, {"a": 1.0})
    multi = MultiSink([sink])
    multi.write(1, {"a": 1.0})  # no open: fails once, disabled, no raise
    assert multi.failures[0].sink == "TensorBoardSink"


def test_unwritable_folder_disables_the_sink(tmp_path):
    blocker = tmp_path / "tensorboard"
    blocker.write_text("a file where the folder should be")
    multi = MultiSink([TensorBoardSink()])
    multi.open(tmp_path, {})
    multi.write(1, {"a": 1.0})
    multi.close()
    assert [f.sink for f in multi.failures] == ["TensorBoardSink"]


def test_records_are_byte_identical_to_tensorboards_record_writer(tmp_path):
    """The C CRC-32C framing (google-crc32c) writes what TensorBoard's RecordWriter does."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    from tdiag.monitor.sinks.tensorboard import _fast_records

    pytest.importorskip("google_crc32c")
    ours, theirs = io.BytesIO(), io.BytesIO()
    fast = _fast_records(ours)
    if fast is None:
        pytest.skip("google-crc32c without its C extension")
    for data in (b"", b"x", bytes(range(256)) * 7):
        fast(data)
        RecordWriter(theirs).write(data)
    assert ours.getvalue() == theirs.getvalue()


def _fill_disk(sink):
    """Make the sink's event file a full disk: its descriptor now points at /dev/full, so
    every write that reaches the kernel fails with ENOSPC (what a full disk gives)."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, sink._writer._file.fileno())
    os.close(full)


@pytest.mark.parametrize("flush_secs", [0, 30])  # error in write() / only at close()
def test_a_full_disk_is_one_warning_and_no_traceback(
    tmp_path, capfd, caplog, monkeypatch, flush_secs
):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)  # a thread's traceback
    sink = TensorBoardSink(flush_secs=flush_secs)
    multi = MultiSink([sink], background=True)
    multi.open(tmp_path, {"config": {"lr": 1e-3}})
    _fill_disk(sink)
    with caplog.at_level(logging.WARNING, logger="tdiag.monitor.sinks.base"):
        for step in range(1, 200 if flush_secs == 0 else 4):  # 3 rows stay in the buffer
            multi.write(step, {"train/loss": 1.0, "train/lr": 1e-3})
        multi.close()
    warnings = [r for r in caplog.records if "TensorBoardSink sink failed" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    assert [f.sink for f in multi.failures] == ["TensorBoardSink"]
    assert multi.failures[0].phase == ("write" if flush_secs == 0 else "close")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and uncaught == []
    assert not [t for t in threading.enumerate() if t.name.startswith("tdiag-sink")]

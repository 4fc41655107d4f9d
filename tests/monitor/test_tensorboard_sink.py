"""TensorBoardSink: scalars and Findings read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import math

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

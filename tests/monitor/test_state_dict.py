"""Monitor state round trip, for resuming a run from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from tdiag import Monitor
from tdiag.history import read_history

from .conftest import ListSink, quiet_options, train_loop


def test_resume_continues_steps_tokens_and_history(tmp_path, tiny_gpt):
    opts = quiet_options(tmp_path, log_every=4)
    with Monitor(tiny_gpt, **opts) as mon:
        train_loop(tiny_gpt, mon, 8)
        state = mon.state_dict()
    assert state["step"] == 8 and state["tokens_total"] == 8 * 64
    restored = torch.load(_save(tmp_path, state), weights_only=True)
    sink = ListSink()
    with Monitor(tiny_gpt, sinks=[sink], **opts) as mon2:
        mon2.load_state_dict(restored)
        assert mon2.state_dict() == state
        train_loop(tiny_gpt, mon2, 5)
    # not step 1 again; the restart marker (at the first step after the checkpoint's) comes
    # with the first row the resumed run writes (step 9 is not a log step)
    assert [s for s, _ in sink.rows] == [9, 12, 13]
    assert sink.rows[0][1] == {"run/restart": 8.0}
    assert sink.rows[1][1]["train/tokens"] == 12 * 64
    df, stats = read_history(tmp_path / "run")
    assert list(df["step"]) == [1, 4, 8, 9, 12, 13] and not stats.problems  # appended


def test_state_dict_keeps_alerts(tmp_path, tiny_gpt):
    with Monitor(tiny_gpt, **quiet_options(tmp_path, log_every=2)) as mon:
        mon.step(torch.tensor(float("nan")))
        state = mon.state_dict()
    assert state["alerted"] == ["train.nonfinite-loss"]
    mon2 = Monitor(tiny_gpt, **quiet_options(tmp_path / "b"))
    mon2.load_state_dict(state)
    mon2.step(torch.tensor(float("nan")))
    mon2.close()
    assert mon2.findings == []  # already raised before the resume: not raised again
    with pytest.raises(ValueError, match="version"):
        mon2.load_state_dict({"version": 99})


def _save(tmp_path, state):
    path = tmp_path / "mon.pt"
    torch.save(state, path)
    return path

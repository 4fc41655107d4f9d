"""Resume keeps the history whole: the reference trainer killed after step 70 and resumed from
its step-60 checkpoint continues the Monitor's steps (its state is in the checkpoint), marks
the restart, and the reader keeps the first run's rows up to the checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_rm_train import tiny_cfg  # this folder is on sys.path (pytest's rootdir mode)

from reference_model.train import attach_monitor, train
from tdiag.history import read_history


class KillAt:
    """Dies after step ``at`` (as a kill would, but inside the process: an exception)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state) -> None:
        if state.step == self.at:
            raise RuntimeError("killed")


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_keeps_the_history_whole(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "ckpt"
    cfg = tiny_cfg(steps=100, log_every=10, checkpoint_every=60, out_dir=str(out))
    mon = attach_monitor(cfg, run_dir, quiet=True)
    with pytest.raises(RuntimeError, match="killed"), mon:
        train(cfg, callbacks=[mon, KillAt(75)])
    first = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first if "train/loss" in r] == [1, 10, 20, 30, 40, 50, 60, 70, 75]

    mon = attach_monitor(cfg, run_dir, quiet=True)
    with mon:
        train(dataclasses.replace(cfg, resume=True), callbacks=[mon])
    rows = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    marker = [r for r in rows if "run/restart" in r]
    assert len(marker) == 1 and marker[0]["step"] == 61 and marker[0]["run/restart"] == 60.0
    resumed = [r["step"] for r in rows[rows.index(marker[0]) + 1 :] if "train/loss" in r]
    assert resumed == [70, 80, 90, 100]  # the Monitor counts on from the checkpoint's step

    df, stats = read_history(run_dir / "history.jsonl")
    trained = df.dropna(subset=["train/loss"])
    # the first run's rows up to the checkpoint, then the resumed run's: nothing else lost
    assert trained["step"].tolist() == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert stats.superseded == 2  # the first run's rows of steps 70 and 75 (replayed)
    assert trained["train/tokens"].is_monotonic_increasing

"""The report shows the forensics: failing step, module, direction, cause and statistics,
in report.json (the promoted finding and the live alerts) and report.html."""

from __future__ import annotations

import json

import pytest

from tests.forensics.runs import loss_fn, train


@pytest.mark.slow
def test_report_shows_module_direction_cause_and_stats(tmp_path) -> None:
    train(
        tmp_path,
        steps=12,
        batch_kw={"zero_row_at": 7},
        forensics=True,
        loss_fn=loss_fn,
        log_every=5,
        snapshot_every=5,
        report=True,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    (rule,) = [f for f in report["findings"] if f["id"] == "train.nonfinite-loss"]
    fx = rule["evidence"]["forensics"]
    assert (fx["step"], fx["module"], fx["direction"], fx["cause"]) == (
        7,
        "gate",
        "backward",
        "data",
    )
    assert rule["where"] == "gate"
    assert "step 7 in the backward of gate" in rule["message"] and "cause: data" in rule["message"]
    live = [a for a in report["live_alerts"] if "forensics" in a["evidence"]]
    assert live and live[0]["evidence"]["forensics"]["stats"]["op_input"]["zero_frac"] > 0
    html = (tmp_path / "report.html").read_text()
    assert "step 7 in the backward of gate" in html and "cause: data" in html
    assert "exact zeros" in html  # the statistics that led there (the live alert's message)


@pytest.mark.slow
def test_report_without_forensics_says_nothing_of_them(tmp_path) -> None:
    train(tmp_path, steps=12, batch_kw={"zero_row_at": 7}, log_every=5, report=True)
    report = json.loads((tmp_path / "report.json").read_text())
    (rule,) = [f for f in report["findings"] if f["id"] == "train.nonfinite-loss"]
    assert "forensics" not in rule["evidence"] and "Forensics" not in rule["message"]

"""`tdiag report`: the command's exit codes, outputs and options (Contract 4)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tdiag.report.rules as rules
from tdiag.cli import app
from tdiag.findings import Finding, Severity
from tdiag.history import HistoryWriter
from tdiag.report import build_report, report_command

runner = CliRunner()


def _strict(text: str):
    def reject(token):
        raise AssertionError(f"bare {token} in JSON output")

    return json.loads(text, parse_constant=reject)


def write_run(
    run: Path, n: int = 300, *, nan_at: int | None = None, meta: dict | None = None
) -> Path:
    """A small, smoothly converging run (optionally with a NaN loss at ``nan_at``)."""
    with HistoryWriter(run / "history.jsonl") as w:
        for s in range(1, n + 1):
            loss = 3.0 * math.exp(-s / 80) + 1.0 + 0.01 * math.sin(s)
            w.write(
                {
                    "step": s,
                    "time": 1000.0 + 0.5 * s,
                    "train/loss": math.nan if s == nan_at else loss,
                    "train/lr": 1e-3 * min(1.0, s / 30),
                    "train/grad_norm": 0.8 + 0.05 * math.cos(s),
                    "perf/tokens_per_sec": 2000.0 + math.sin(s),
                    "perf/step_time": 0.5,
                }
            )
            if s % 50 == 0:
                w.write({"step": s, "val/loss": loss + 0.05})
    if meta is not None:
        (run / "meta.json").write_text(json.dumps(meta))
    return run


class FakeResult:
    def __init__(self, findings):
        self.findings = findings
        self.analyses = {"fake": {"x": math.nan}}
        self.skipped = [{"id": "train.overfitting", "reason": "no val/loss"}]


def _fake_rules(monkeypatch, *severities: Severity) -> None:
    findings = [
        Finding(id=f"train.fake-{i}", severity=sev, title=f"fake {sev.value}", step=10 * (i + 1))
        for i, sev in enumerate(severities)
    ]
    monkeypatch.setattr(rules, "evaluate", lambda df, meta, events: FakeResult(findings))


@pytest.mark.parametrize(
    ("severities", "fail_on", "met"),
    [
        ((), None, False),
        (("error",), None, False),
        ((), "warning", False),
        (("info",), "warning", False),
        (("warning",), "error", False),
        (("warning",), "warning", True),
        (("error",), "error", True),
        (("error", "info"), "warning", True),
    ],
)
def test_fail_on_threshold(severities, fail_on, met):
    from tdiag.report import _fails

    assert _fails({"findings": [{"severity": s} for s in severities]}, fail_on) is met


@pytest.mark.parametrize(
    ("severities", "fail_on", "code"),
    [
        ((Severity.WARNING,), "error", 0),
        ((Severity.WARNING,), "warning", 1),
        ((Severity.ERROR,), "error", 1),
    ],
)
def test_fail_on_exit_codes(tmp_path, monkeypatch, severities, fail_on, code):
    run = write_run(tmp_path / "run", n=60)
    _fake_rules(monkeypatch, *severities)
    assert report_command(run, json_out=True, out=None, fail_on=fail_on) == code
    assert (run / "report.json").exists() and (run / "report.html").exists()


def test_fail_on_rejects_unknown_value(tmp_path, capsys):
    run = write_run(tmp_path / "run", n=20)
    assert report_command(run, json_out=False, out=None, fail_on="bogus") == 2
    assert "--fail-on must be one of error, warning" in capsys.readouterr().err
    assert not (run / "report.json").exists()


def test_json_stdout_is_the_report_and_nothing_else(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", n=60)
    _fake_rules(monkeypatch, Severity.WARNING)
    assert report_command(run, json_out=True, out=None, fail_on=None) == 0
    printed = _strict(capsys.readouterr().out)
    on_disk = _strict((run / "report.json").read_text())
    assert printed == on_disk
    assert {
        "tdiag_version",
        "run",
        "summary",
        "findings",
        "analyses",
        "skipped",
        "history_problems",
    } <= set(printed)
    assert printed["findings"][0]["id"] == "train.fake-0"
    assert printed["analyses"] == {"fake": {"x": "NaN"}}  # non-finite encoded, strict JSON
    assert printed["summary"]["warnings"] == 1 and printed["summary"]["errors"] == 0


def test_out_dir_and_console_summary(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", n=60, meta={"name": "cli-run", "config": {"grad_clip": 1.0}})
    _fake_rules(monkeypatch, Severity.ERROR)
    out = tmp_path / "elsewhere" / "deep"
    result = runner.invoke(app, ["report", str(run), "--out", str(out), "--fail-on", "error"])
    assert result.exit_code == 1, result.output
    assert (out / "report.json").exists() and (out / "report.html").exists()
    assert not (run / "report.json").exists()
    assert "train.fake-0" in result.output and "Final train loss" in result.output
    assert str(out / "report.html") in result.output.replace("\n", "")
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["name"] == "cli-run"


def test_history_file_path_is_accepted(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", n=40, meta={"name": "by-file"})
    _fake_rules(monkeypatch)
    report = build_report(run / "history.jsonl")
    assert report["run"]["name"] == "by-file"  # meta read beside the file
    assert (run / "report.html").exists()


def test_missing_run_exits_2_with_message(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "cannot read the run" in result.output and "nope" in result.output


def test_real_rules_find_a_nan_and_fail_on_error(tmp_path):
    """End to end with the real rules: a NaN loss is an error-level finding, marked in the HTML."""
    run = write_run(tmp_path / "run", n=300, nan_at=250)
    assert report_command(run, json_out=True, out=None, fail_on="error") == 1
    report = json.loads((run / "report.json").read_text())
    ids = [f["id"] for f in report["findings"]]
    assert "train.nonfinite-loss" in ids
    nonfinite = report["findings"][ids.index("train.nonfinite-loss")]
    assert nonfinite["severity"] == "error" and nonfinite["step"] == 250
    html = (run / "report.html").read_text()
    assert 'href="#chart-loss"' in html and 'id="chart-loss"' in html


def test_healthy_run_has_no_warning(tmp_path):
    run = write_run(tmp_path / "run", n=300)
    assert report_command(run, json_out=True, out=None, fail_on="warning") == 0


@pytest.mark.slow
def test_installed_entry_point(tmp_path):
    run = write_run(tmp_path / "run", n=50)
    exe = Path(sys.executable).with_name("tdiag")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tdiag.cli"]
    proc = subprocess.run(
        [*cmd, "report", str(run), "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert _strict(proc.stdout)["summary"]["steps"] == 50

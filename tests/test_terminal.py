"""The CLI's consoles: no wrapping at 80 columns when the output is a pipe or a log."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from tdiag.cli import app
from tdiag.terminal import UNWRAPPED_WIDTH, output_console

ROOT = Path(__file__).parents[1]


def test_off_a_terminal_nothing_wraps(monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    console = output_console()  # pytest captures stdout: not a terminal
    assert not console.is_terminal
    assert console.width == UNWRAPPED_WIDTH and console.soft_wrap


def test_columns_and_an_explicit_width_still_win(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    assert output_console().width == 120
    monkeypatch.delenv("COLUMNS")
    assert output_console(width=50).width == 50


def test_report_summary_lines_are_whole_in_a_pipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    run = tmp_path / ("a_long_folder_name_for_a_run_" * 4)
    shutil.copytree(ROOT / "reports" / "example", run)
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert f"wrote {run / 'report.html'}" in lines  # a path longer than 80 columns, on one line
    assert any(line.startswith("What to do first (#1): ") and len(line) > 80 for line in lines)

"""Format versions of the history: the golden history of format 1 keeps reading back
exactly, files without a marker are format 1, and a newer format is refused by name."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tdiag.history import (
    HISTORY_SCHEMA,
    SCHEMA_KEY,
    HistoryReadError,
    HistorySchemaError,
    read_history,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden_history"
HEALTHY = Path(__file__).parent / "report" / "fixtures" / "healthy"


def _cells(values: list) -> np.ndarray:
    return np.array([math.nan if v == "NaN" else v for v in values], dtype=float)


def test_golden_history_reads_back_exactly():
    expected = json.loads((GOLDEN / "expected.json").read_text())
    df, stats = read_history(GOLDEN)
    assert expected["format"] == 1 and stats.schema == 1
    assert list(df.columns) == expected["columns"]
    assert {c: str(df[c].dtype) for c in df.columns} == expected["dtypes"]
    for col in expected["columns"]:
        got = df[col].to_numpy()
        assert np.array_equal(got, _cells(expected["data"][col]), equal_nan=True), col
    now = stats.to_dict()
    assert {k: now[k] for k in expected["read_stats"]} == expected["read_stats"]


def test_a_history_without_marker_is_format_1():
    """Histories written before the marker existed (the healthy fixture) read the same."""
    golden, _ = read_history(GOLDEN)
    legacy, stats = read_history(HEALTHY)
    assert stats.schema is None and not stats.problems
    assert legacy.equals(golden)


def _newer(tmp_path: Path, version: object, *, line: int = 0) -> Path:
    run = tmp_path / "run"
    shutil.copytree(GOLDEN, run)
    lines = (run / "history.jsonl").read_text().splitlines()
    row = json.loads(lines[line])
    row[SCHEMA_KEY] = version
    lines[line] = json.dumps(row)
    (run / "history.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize("line", [0, 40])  # a new run, or a run resumed by a newer tdiag
def test_a_newer_format_is_refused_naming_both_versions(tmp_path, line):
    run = _newer(tmp_path, HISTORY_SCHEMA + 1, line=line)
    with pytest.raises(HistorySchemaError) as info:
        read_history(run)
    assert isinstance(info.value, HistoryReadError)  # the report's exit-2 path catches it
    assert (info.value.found, info.value.supported) == (2, 1)
    assert "format 2" in str(info.value) and "up to 1" in str(info.value)


def test_tdiag_report_on_a_newer_format_exits_2_with_the_message(tmp_path):
    run = _newer(tmp_path, 2)
    proc = subprocess.run(
        [sys.executable, "-m", "tdiag.cli", "report", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "history format 2" in err and "reads formats up to 1" in err
    assert "Traceback" not in proc.stderr and not (run / "report.json").exists()


@pytest.mark.parametrize("marker", ["2", True, 1.5, 0, None, [2]])
def test_an_unreadable_marker_is_stated_not_fatal(tmp_path, marker):
    run = _newer(tmp_path, marker)
    df, stats = read_history(run)
    assert len(df) == 73 and SCHEMA_KEY not in df.columns
    if marker is None:  # null: as if absent
        assert not stats.problems
    else:
        assert stats.bad_schema == 1 and any(SCHEMA_KEY in p for p in stats.problems)

"""report.json carries ``report_schema``; a report from a newer tdiag is refused clearly."""

from __future__ import annotations

import json

import pytest

from tdiag import __version__
from tdiag.report.render_json import (
    REPORT_SCHEMA,
    ReportReadError,
    ReportSchemaError,
    assemble_report,
    read_report_json,
    write_report_json,
)


def test_report_json_carries_the_schema_and_reads_back(tmp_path):
    report = assemble_report(
        meta={"name": "r"}, summary={}, findings=[], analyses={"a": float("nan")},
        skipped=[], history_problems=[],
    )  # fmt: skip
    assert report["report_schema"] == REPORT_SCHEMA == 1
    write_report_json(tmp_path, report)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["report_schema"] == 1
    assert read_report_json(tmp_path) == on_disk == report


def test_a_newer_report_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"report_schema": REPORT_SCHEMA + 1, "findings": []}))
    with pytest.raises(ReportSchemaError) as info:
        read_report_json(path)
    msg = str(info.value)
    assert f"report format {REPORT_SCHEMA + 1}" in msg and f"up to {REPORT_SCHEMA}" in msg
    assert __version__ in msg and "upgrade tdiag" in msg
    assert info.value.found == REPORT_SCHEMA + 1


def test_a_report_without_the_key_is_format_1(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"tdiag_version": "0.0.1", "findings": []}))
    assert read_report_json(path)["findings"] == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "no report at"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "a JSON object was expected"),
        ('{"report_schema": "two"}', "unreadable report_schema"),
        ('{"report_schema": 0}', "unreadable report_schema"),
        ('{"report_schema": 1.5}', "unreadable report_schema"),
        ("[" * 100_000, "is not JSON"),
    ],
)
def test_bad_report_files_give_one_clear_error(tmp_path, text, match):
    path = tmp_path / "report.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ReportReadError, match=match):
        read_report_json(path)

"""report.json (Contract 4): assemble the report object, write it as strict JSON, read it back.

Every report.json carries ``"report_schema": N`` (:data:`REPORT_SCHEMA`), the version of its
layout; :func:`read_report_json` refuses one from a newer tdiag with a message naming both
versions, instead of misreading keys it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tdiag.findings import Finding, TdiagError, count_by_severity, to_jsonable
from tdiag.history import write_json_atomic

__all__ = [
    "REPORT_JSON",
    "REPORT_SCHEMA",
    "ReportReadError",
    "ReportSchemaError",
    "assemble_report",
    "dumps_report",
    "read_report_json",
    "write_report_json",
]

REPORT_JSON = "report.json"
REPORT_SCHEMA = 1
"""The report.json layout this tdiag writes, and the newest it reads (a top-level key)."""


def assemble_report(
    *,
    meta: Mapping[str, Any],
    summary: Mapping[str, Any],
    findings: Sequence[Finding],
    analyses: Mapping[str, Any],
    skipped: Sequence[Mapping[str, Any]],
    history_problems: Sequence[str],
    read_stats: Mapping[str, Any] | None = None,
    live_alerts: Sequence[Finding] = (),
) -> dict[str, Any]:
    """The report object, JSON-safe (non-finite floats as "NaN"/"Infinity" strings).

    Keys: ``report_schema`` (:data:`REPORT_SCHEMA`), ``tdiag_version``, ``run`` (meta.json), ``summary`` (headline numbers plus
    ``errors``/``warnings``/``infos`` counts), ``findings`` (Contract-2 objects, in the
    order given: worst first), ``analyses``, ``skipped`` ([{"id", "reason"}]),
    ``history_problems`` (sentences), ``history_read`` (the reader's counters) and
    ``live_alerts`` (the Findings the Monitor raised while training, from events.jsonl;
    not counted in the summary: the rules re-derive what matters from the history).
    """
    from tdiag import __version__

    summary_out = dict(summary)
    summary_out.update(count_by_severity(findings))
    report = {
        "report_schema": REPORT_SCHEMA,
        "tdiag_version": __version__,
        "run": dict(meta),
        "summary": summary_out,
        "findings": [f.to_dict() for f in findings],
        "analyses": dict(analyses),
        "skipped": [dict(s) for s in skipped],
        "history_problems": list(history_problems),
        "history_read": dict(read_stats or {}),
        "live_alerts": [f.to_dict() for f in live_alerts],
    }
    return to_jsonable(report)


def dumps_report(report: Mapping[str, Any], *, indent: int | None = 2) -> str:
    """Strict JSON text of a report (raises ValueError if a non-finite float slipped in)."""
    return json.dumps(to_jsonable(report), indent=indent, allow_nan=False)


def write_report_json(out_dir: Path, report: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.json`` atomically; returns its path."""
    path = Path(out_dir) / REPORT_JSON
    write_json_atomic(path, report)
    return path


class ReportReadError(TdiagError):
    """A report.json that cannot be read: missing, not JSON, or not a report object."""


class ReportSchemaError(ReportReadError):
    """A report.json written in a newer layout than this tdiag reads.

    Attributes:
        found: the ``report_schema`` in the file.
        supported: the newest this tdiag reads (:data:`REPORT_SCHEMA`).
    """

    def __init__(self, path: str | Path, found: int) -> None:
        from tdiag import __version__

        self.found, self.supported = found, REPORT_SCHEMA
        shown = str(found) if len(str(found)) <= 12 else f"{str(found)[:12]}…"
        super().__init__(
            f"{path} is in report format {shown}, written by a newer tdiag; this tdiag "
            f"({__version__}) reads report formats up to {REPORT_SCHEMA}: upgrade tdiag"
        )


def read_report_json(path: str | Path) -> dict[str, Any]:
    """Read a report.json (or the one in a run folder), checking its ``report_schema``.

    A report without the key is format 1 (written before it existed).

    Raises:
        ReportSchemaError: the report is in a newer format than :data:`REPORT_SCHEMA`.
        ReportReadError: missing, unreadable, not JSON, not an object, or a bad marker.
    """
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportReadError(f"no report at {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: undecodable bytes, a NUL in the path
        raise ReportReadError(f"cannot read {path}: {exc}") from exc
    try:
        report = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ReportReadError(f"{path} is not JSON ({exc})") from None
    if not isinstance(report, dict):
        raise ReportReadError(f"{path} is not a report: a JSON object was expected")
    version = report.get("report_schema", 1)
    if type(version) is not int or version < 1:
        raise ReportReadError(f"{path} has an unreadable report_schema {str(version)[:40]!r}")
    if version > REPORT_SCHEMA:
        raise ReportSchemaError(path, version)
    return report

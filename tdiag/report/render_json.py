"""report.json (Contract 4): assemble the report object and write it as strict JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tdiag.findings import Finding, count_by_severity, to_jsonable
from tdiag.history import write_json_atomic

__all__ = ["REPORT_JSON", "assemble_report", "dumps_report", "write_report_json"]

REPORT_JSON = "report.json"


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

    Keys: ``tdiag_version``, ``run`` (meta.json), ``summary`` (headline numbers plus
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

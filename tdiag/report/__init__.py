"""The report (Contract 4): a run's history -> findings and recommendations, as JSON and HTML.

``tdiag report RUN_DIR`` calls :func:`report_command`; a Monitor calls :func:`build_report`
when it closes. Both read ``RUN_DIR/history.jsonl`` (plus meta.json and events.jsonl when
present), run the rules (:func:`tdiag.report.rules.evaluate`), and write ``report.json``
and a self-contained ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tdiag.findings import Finding, Severity
from tdiag.history import (
    EVENTS_FILE,
    HISTORY_FILE,
    META_FILE,
    HistoryReadError,
    read_events,
    read_history,
)

__all__ = ["FAIL_ON", "HistoryReadError", "build_report", "report_command"]

logger = logging.getLogger(__name__)

FAIL_ON = ("error", "warning")


def _locate(run_dir: Path) -> tuple[Path, Path]:
    """(history file, run folder) for a run folder or a path to a history file."""
    if run_dir.is_dir():
        history = run_dir / HISTORY_FILE
        if not history.exists():
            runs = sorted(p.parent for p in run_dir.glob(f"*/{HISTORY_FILE}"))
            if runs:  # a folder of runs (e.g. reports/): name them
                names = ", ".join(str(p) for p in runs[:5]) + (", …" if len(runs) > 5 else "")
                raise HistoryReadError(
                    f"no {HISTORY_FILE} in {run_dir}, but {len(runs)} run folder(s) below it: "
                    f"{names}; pass one of them"
                )
        return history, run_dir
    if run_dir.exists() or run_dir.suffix == ".jsonl":
        return run_dir, run_dir.parent
    raise HistoryReadError(f"no run folder or history file at {run_dir}")


def _read_meta(folder: Path) -> tuple[dict[str, Any], list[str]]:
    path = folder / META_FILE
    if not path.exists():
        return {}, []
    try:
        meta = json.loads(path.read_text(encoding="utf-8"), parse_constant=float)
    except (OSError, ValueError) as exc:
        return {}, [
            f"{META_FILE} could not be read ({exc.__class__.__name__}: {exc}); run metadata omitted"
        ]
    if not isinstance(meta, dict):
        return {}, [f"{META_FILE} is not a JSON object; run metadata omitted"]
    return meta, []


def _read_events(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        return read_events(folder), []
    except OSError as exc:
        return [], [f"{EVENTS_FILE} could not be read ({exc}); live alerts omitted"]


def _live_alerts(events: list[dict[str, Any]]) -> tuple[list[Finding], list[str]]:
    """The Findings the Monitor raised while training (events.jsonl), in file order."""
    alerts, bad = [], 0
    for event in events:
        try:
            alerts.append(Finding.from_dict(event))
        except (ValueError, TypeError):
            bad += 1
    problems = [f"{bad} line(s) of {EVENTS_FILE} were not Findings and were skipped"] if bad else []
    return alerts, problems


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    console: Any = None,
    history: tuple[Any, Any] | None = None,
    html_hook: Any = None,
) -> dict[str, Any]:
    """Read a run folder, evaluate the rules, write report.json and report.html.

    Args:
        run_dir: the run folder (or a history.jsonl; meta/events are then read beside it).
        out: folder for report.json/report.html (default: the run folder).
        console: a :class:`rich.console.Console` to print the short summary to, or None.
        history: ``(frame, ReadStats)`` already read (``tdiag report --watch`` reads only
            the new lines, :mod:`tdiag.report.watch`); None: read the run's history.
        html_hook: ``str -> str`` applied to the page before it is written (the watch's
            auto-refresh, a link to a comparison); None: the page as rendered.

    Returns:
        The report.json object (strict-JSON-safe dict).

    Raises:
        HistoryReadError: no readable row in the history (or no history at all).
        OSError: the output folder cannot be written.
    """
    from tdiag.report.charts import build_charts
    from tdiag.report.render_html import render_html, write_report_html
    from tdiag.report.render_json import assemble_report, write_report_json
    from tdiag.report.rules import evaluate
    from tdiag.report.summary import summarize

    run_dir = Path(run_dir)
    history_path, folder = _locate(run_dir)
    df, stats = history if history is not None else read_history(history_path)
    meta, meta_problems = _read_meta(folder)
    events, event_problems = _read_events(folder)
    alerts, alert_problems = _live_alerts(events)
    result = evaluate(df, meta, events)  # findings come ranked: severity, impact, step
    findings = list(result.findings)
    from tdiag.report.run_status import run_status

    summary = summarize(df, meta)
    last = int(df["step"].max()) if len(df) else None
    summary["run_status"] = run_status(meta, folder, last)
    # NaN/Inf values in the history are data (a NaN loss is news, and the rules judge it),
    # not a problem reading the file: counted in the summary, left out of history_problems
    summary["nonfinite_values"] = stats.nonfinite_values
    read_problems = dataclasses.replace(stats, nonfinite_values=0).problems
    report = assemble_report(
        meta=meta,
        summary=summary,
        findings=findings,
        analyses=result.analyses,
        skipped=result.skipped,
        history_problems=[*read_problems, *meta_problems, *event_problems, *alert_problems],
        read_stats=stats.to_dict(),
        live_alerts=alerts,
    )
    charts = build_charts(df, meta, findings)
    html = render_html(report, findings, charts, source=str(run_dir), live_alerts=alerts)
    if html_hook is not None:
        html = html_hook(html)
    out_dir = Path(out) if out is not None else folder
    written = [write_report_json(out_dir, report), write_report_html(out_dir, html)]
    logger.info("report written to %s", out_dir)
    if console is not None:
        from tdiag.report.console import render_console

        render_console(console, report, findings, written=written)
    return report


def _fails(report: dict[str, Any], fail_on: str | None) -> bool:
    if fail_on is None:
        return False
    worst = {"error": (Severity.ERROR,), "warning": (Severity.ERROR, Severity.WARNING)}[fail_on]
    return any(f.get("severity") in {s.value for s in worst} for f in report.get("findings", []))


def report_command(run_dir: Path, *, json_out: bool, out: Path | None, fail_on: str | None) -> int:
    """``tdiag report``: exit 0, 1 when ``--fail-on`` is met, 2 when the run cannot be read.

    With ``json_out`` the report.json object is printed to stdout (and nothing else is);
    otherwise a short rich summary is. Messages about failures go to stderr.
    """
    from tdiag.report.render_json import dumps_report
    from tdiag.terminal import output_console

    err = output_console(stderr=True)
    if fail_on is not None:
        fail_on = fail_on.strip().lower()
        if fail_on not in FAIL_ON:
            err.print(
                f"tdiag report: --fail-on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}",
                markup=False,
            )
            return 2
    console = None if json_out else output_console()  # unwrapped in a log
    try:
        report = build_report(run_dir, out, console=console)
    except HistoryReadError as exc:
        err.print(f"tdiag report: cannot read the run at {run_dir}: {exc}", markup=False)
        return 2
    except OSError as exc:
        err.print(f"tdiag report: cannot write the report: {exc}", markup=False)
        return 2
    if json_out:
        sys.stdout.write(dumps_report(report) + "\n")
    return 1 if _fails(report, fail_on) else 0

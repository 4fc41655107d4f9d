"""report.html: one self-contained page; its charts are drawn in the page from embedded data.

Rendered with jinja2 with autoescaping on: every string that comes from the run (names,
config values, finding text) is escaped; the charts' data travels as JSON in a
``<script type="application/json">`` block with ``<``, ``>`` and ``&`` escaped, and is
only ever set as text by the page's script. Scripts and style are inline and allowed by
hash in the page's CSP (see :mod:`tdiag.report.charts.assets`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from tdiag.findings import Finding, count_by_severity
from tdiag.history import write_text_atomic
from tdiag.report.charts import (
    Chart,
    chart_data_script,
    chart_figure,
    chart_keys_for_finding,
    finding_span,
    finding_steps,
    page_assets,
)
from tdiag.report.summary import format_number, headline_cards

__all__ = ["REPORT_HTML", "render_html", "write_report_html"]

REPORT_HTML = "report.html"
_MAX_LIST_ITEMS = 12
_MAX_TEXT = 400
_MAX_META_ROWS = 400


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tdiag.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def format_evidence(value: Any) -> str:
    """One evidence value as short text: numbers rounded, long lists cut with a count."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return format_number(value)
    if isinstance(value, list | tuple):
        head = ", ".join(format_evidence(v) for v in value[:_MAX_LIST_ITEMS])
        more = len(value) - _MAX_LIST_ITEMS
        return f"[{head}{f', … ({more} more)' if more > 0 else ''}]"
    if isinstance(value, Mapping):
        items = list(value.items())
        head = ", ".join(f"{k}: {format_evidence(v)}" for k, v in items[:_MAX_LIST_ITEMS])
        return "{" + head + (", …" if len(items) > _MAX_LIST_ITEMS else "") + "}"
    text = str(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"


def _label(key: Any) -> str:
    """An evidence key as a label: ``best_val_step`` -> ``best val step``."""
    return str(key).replace("_", " ")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, Mapping):
        rows: list[tuple[str, str]] = []
        for k, v in obj.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    return [(prefix, format_evidence(obj))]


def _finding_views(findings: Sequence[Finding], charts: Sequence[Chart]) -> list[dict[str, Any]]:
    titles = {c.key: c.title for c in charts}
    views = []
    for number, f in enumerate(findings, start=1):
        keys = chart_keys_for_finding(f, titles)
        evidence = dict(f.evidence) if isinstance(f.evidence, Mapping) else {"value": f.evidence}
        impact = evidence.pop("impact", None)
        span = finding_span(f)  # a well-formed evidence["step_range"], shown as "a – b"
        if span is not None:
            evidence.pop("step_range")
        rows = [(_label(k), format_evidence(v)) for k, v in evidence.items()]
        if span is not None:
            rows.insert(
                0, ("steps judged", f"{format_evidence(span[0])} – {format_evidence(span[1])}")
            )
        views.append(
            {
                "number": number,
                "id": f.id,
                "severity": f.severity.value,
                "title": f.title,
                "message": f.message,
                "where": f.where,
                "step": f.step,
                "evidence": rows,
                "impact": f"{impact:.2f}" if isinstance(impact, int | float) else None,
                "recommendation": f.recommendation,
                "docs": f.docs,
                "chart_anchor": "chart-" + keys[0] if keys else None,
                "chart_title": titles[keys[0]].lower() if keys else None,
            }
        )
    return views


def _chart_marks(
    findings: Sequence[Finding], charts: Sequence[Chart]
) -> dict[str, list[tuple[int, str]]]:
    keys = [c.key for c in charts]
    out: dict[str, list[tuple[int, str]]] = {k: [] for k in keys}
    for number, f in enumerate(findings, start=1):
        if not finding_steps(f):
            continue
        for key in chart_keys_for_finding(f, keys):
            out[key].append((number, f.title))
    return out


def _figures(charts: Sequence[Chart], marks: Mapping[str, list[tuple[int, str]]]) -> dict:
    """Each chart's ``<figure>``, with links to the findings marked on it."""
    out = {}
    for c in charts:
        after = Markup("")
        if marks.get(c.key):
            links = Markup("; ").join(
                Markup('<a href="#finding-{n}">{n}</a> {title}').format(n=n, title=title)
                for n, title in marks[c.key]
            )
            after = Markup('<div class="marks">Marked: {}</div>').format(links)
        out[c.key] = chart_figure(c, after=after)
    return out


def _css() -> str:
    from importlib import resources

    return resources.files("tdiag.report").joinpath("assets", "report.css").read_text("utf-8")


def run_name(meta: Mapping[str, Any], source: str) -> str:
    """A display name: meta's ``name``/``run_name`` or the run folder's name."""
    for key in ("name", "run_name"):
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return Path(source).name or source


def render_html(
    report: Mapping[str, Any],
    findings: Sequence[Finding],
    charts: Sequence[Chart],
    *,
    source: str,
    live_alerts: Sequence[Finding] = (),
) -> str:
    """The HTML page of a report.

    Args:
        report: the report.json object (summary, run meta, skipped, history_problems).
        findings: the same findings as Finding objects, in display order (numbered 1..).
        charts: from :func:`tdiag.report.charts.build_charts` with the same findings.
        source: the run folder or history path, shown under the title.
        live_alerts: Findings the Monitor raised while training (events.jsonl), listed apart
            (those also among ``findings``, the loop findings, link to their number).
    """
    from tdiag import __version__
    from tdiag.report.rules import RULES
    from tdiag.report.rules.live import SOURCE as LIVE_SOURCE

    meta = report.get("run") or {}
    summary = report.get("summary") or {}
    # live loop findings that the report also lists among its findings: link to them
    promoted = {
        (f.id, f.step): n
        for n, f in enumerate(findings, start=1)
        if f.evidence.get("source") == LIVE_SOURCE
    }
    context = {
        "version": __version__,
        "run_name": run_name(meta, source),
        "source": source,
        "counts": count_by_severity(findings),
        "cards": headline_cards(summary),
        "run_status": summary.get("run_status"),
        "problems": list(report.get("history_problems") or []),
        "findings": _finding_views(findings, charts),
        "skipped": [
            {"id": str(s.get("id", "?")), "reason": str(s.get("reason", ""))}
            for s in report.get("skipped") or []
        ],
        "n_rules": len(RULES),
        "charts": list(charts),
        "figures": _figures(charts, _chart_marks(findings, charts)),
        "chart_data": chart_data_script(charts),
        "assets": page_assets(extra_css=_css()),
        "meta_rows": _flatten(meta)[:_MAX_META_ROWS],
        "rows": summary.get("rows") or 0,
        "alerts": [
            {
                "severity": a.severity.value,
                "id": a.id,
                "step": a.step,
                "title": a.title,
                "message": a.message,
                "finding": promoted.get((a.id, a.step)),
            }
            for a in live_alerts
        ],
    }
    return _environment().get_template("report.html.j2").render(**context)


def write_report_html(out_dir: Path, html: str) -> Path:
    """Write ``out_dir/report.html`` atomically; returns its path."""
    path = Path(out_dir) / REPORT_HTML
    write_text_atomic(path, html)
    return path

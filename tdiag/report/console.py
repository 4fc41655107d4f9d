"""A short terminal summary of a report: headline numbers, then the findings table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tdiag.findings import Finding, count_by_severity
from tdiag.report.summary import headline_cards

__all__ = ["render_console"]

_STYLES = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}
_MAX_RECOMMENDATION = 300  # characters: the terminal summary stays short; the HTML has it all


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + " …"


def render_console(
    console: Console,
    report: Mapping[str, Any],
    findings: Sequence[Finding],
    *,
    written: Sequence[Path] = (),
) -> None:
    """Print the headline numbers, history problems, findings and the files written.

    Run text (titles, module names) is printed as plain :class:`rich.text.Text`, so
    square brackets in it are never read as rich markup.
    """
    summary = report.get("summary") or {}
    cards = [c for c in headline_cards(summary) if c["value"] != "–"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    for card in cards:
        value = Text(card["value"], style="bold")
        if card["sub"]:
            value.append(f"  ({card['sub']})", style="dim")
        head.add_row(card["label"], value)
    console.print(Text("tdiag report", style="bold"))
    status = summary.get("run_status")
    if status:
        style = {"completed": "green", "running": "cyan", "terminated": "yellow"}.get(
            status.get("state"), "red"
        )
        console.print(Text(str(status.get("text")), style=style))
    console.print(head)

    for problem in report.get("history_problems") or []:
        console.print(Text("history: ", style="yellow") + Text(str(problem)))

    counts = count_by_severity(findings)
    if findings:
        table = Table(title=None, show_lines=False, expand=False, pad_edge=False)
        table.add_column("#", justify="right", style="dim")
        table.add_column("severity")
        table.add_column("id")
        table.add_column("step", justify="right")
        table.add_column("finding", overflow="fold")
        for number, f in enumerate(findings, start=1):
            sev = f.severity.value
            table.add_row(
                str(number),
                Text(sev, style=_STYLES.get(sev, "")),
                Text(f.id),
                "" if f.step is None else str(f.step),
                Text(f.title),
            )
        console.print(table)
        top = findings[0]
        if top.recommendation and top.severity.value != "info":
            console.print(
                Text("What to do first (#1): ", style="bold")
                + Text(_shorten(top.recommendation, _MAX_RECOMMENDATION))
            )
        console.print(
            Text("What a finding means and what to do: ", style="dim")
            + Text(f"tdiag explain {top.id}")
            + Text(" (any id above); the HTML report has it all", style="dim")
        )
    summary_line = Text()
    summary_line.append(
        f"{counts['errors']} error(s)", style=_STYLES["error"] if counts["errors"] else ""
    )
    summary_line.append(", ")
    summary_line.append(
        f"{counts['warnings']} warning(s)", style=_STYLES["warning"] if counts["warnings"] else ""
    )
    summary_line.append(f", {counts['infos']} info")
    skipped = report.get("skipped") or []
    if skipped:
        from tdiag.report.rules import RULES

        thin = len(skipped) * 2 > len(RULES)
        summary_line.append(
            f"; {len(skipped)} analysis(es) skipped"
            + (" for lack of data (metrics not logged or too few points)" if thin else ""),
            style="yellow" if thin else "dim",
        )
    alerts = report.get("live_alerts") or []
    if alerts:
        summary_line.append(f"; {len(alerts)} live alert(s) raised while training", style="dim")
    console.print(summary_line)
    for path in written:
        console.print(Text("wrote ", style="dim") + Text(str(path)))

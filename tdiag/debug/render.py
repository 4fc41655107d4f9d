"""The rich console report of ``tdiag check``: findings grouped by severity, then the checks.

Writes only to the console it is given (tests inject one recording to a string).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.results import CheckRun

__all__ = ["format_evidence", "render_report"]

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_HEADING = {Severity.ERROR: "Errors", Severity.WARNING: "Warnings", Severity.INFO: "Info"}
_MARK = {Severity.ERROR: "✗", Severity.WARNING: "!", Severity.INFO: "i"}
_STATUS_STYLE = {"pass": "green", "fail": "red", "skipped": "dim", "error": "magenta"}
#: Evidence values longer than this (tables, per-parameter lists) are left to --json.
_MAX_INLINE_ITEMS = 6


def _num(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def _value(v: Any) -> str:
    """One evidence value, numbers shortened, nested dicts and lists included."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{a}: {_value(b)}" for a, b in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def format_evidence(evidence: dict[str, Any]) -> str:
    """``key=value`` pairs on one line; long lists/tables summarised (full data in --json)."""
    parts = []
    for k, v in evidence.items():
        if isinstance(v, list | tuple | dict) and len(v) > _MAX_INLINE_ITEMS:
            s = f"<{len(v)} rows: see --json>"
        else:
            s = _value(v)
        parts.append(f"{k}={s}")
    return "  ".join(parts)


def _finding(console: Console, f: Finding) -> None:
    style = _STYLE[f.severity]
    where = f"  [dim]at[/] [bold]{escape(f.where)}[/]" if f.where else ""
    console.print(f" [{style}]{_MARK[f.severity]} {escape(f.id)}[/]{where}")
    console.print(f"   {escape(f.title)}")
    if f.message:
        console.print(f"   {escape(f.message)}", style="default")
    if f.evidence:
        console.print(f"   [dim]evidence:[/] {escape(format_evidence(f.evidence))}")
    if f.recommendation:
        console.print(f"   [green]→ {escape(f.recommendation)}[/]")
    # the docs field is a path in the source tree; `tdiag explain` prints it wherever tdiag is
    console.print(f"   [dim]more: tdiag explain {escape(f.id)}  ({escape(f.docs)})[/]")


def render_report(run: CheckRun, *, target: str, console: Console) -> None:
    """Print the report of a check run to ``console``."""
    meta = run.meta
    console.print(f"[bold]tdiag check[/] {escape(target)}")
    if meta:
        console.print(
            f"[dim]{meta.get('model')} · {meta.get('parameters', 0):,} parameters · batch "
            f"{meta.get('batch_shape')} ({meta.get('batch_source')}) · vocab {meta.get('vocab_size')}"
            f" · {'causal' if meta.get('causal') else 'bidirectional'} · {meta.get('device')}[/]"
        )
    findings = run.findings
    for sev in (Severity.ERROR, Severity.WARNING, Severity.INFO):
        group = [f for f in findings if f.severity == sev]
        if not group:
            continue
        console.print()
        console.print(f"[{_STYLE[sev]}]{_HEADING[sev]} ({len(group)})[/]")
        for f in group:
            _finding(console, f)

    console.print()
    table = Table(title=None, show_edge=False, box=None, pad_edge=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("s", justify="right")
    table.add_column("note", overflow="fold")
    for r in run.results:
        table.add_row(
            r.id,
            f"[{_STATUS_STYLE[r.status]}]{r.status}[/]",
            f"{r.seconds:.2f}",
            escape(r.message),
        )
    console.print(table)
    s = run.summary
    counts = {
        st: sum(r.status == st for r in run.results) for st in ("pass", "fail", "skipped", "error")
    }
    verdict = "[bold red]errors found[/]" if s["errors"] else "[bold green]no errors[/]"
    took = f"in {run.seconds:.1f} s"
    if run.error is not None:  # stopped part-way: its cause follows on stderr
        verdict = f"[bold red]incomplete[/], {'errors' if s['errors'] else 'no errors'} so far"
        # the checks' time, not the --timeout's (which counts loading too): said, not implied
        took = f"after {run.seconds:.1f} s of checks (loading not counted; stopped: see below)"
    console.print()
    console.print(
        f"{verdict}: {s['errors']} error(s), {s['warnings']} warning(s), {s['infos']} info · "
        f"{len(run.results)} checks ({counts['pass']} pass, {counts['fail']} fail, "
        f"{counts['skipped']} skipped, {counts['error']} error) {took}"
    )

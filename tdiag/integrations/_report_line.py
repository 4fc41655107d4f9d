"""The one line an adapter prints when training ends: where the report went.

The adapters run the Monitor without its live console (the trainers have their own progress
bars), so without this line a run ends in silence and the user has to guess where
``report.html`` is. Written to stderr, by rank 0 only, and not at all when the Monitor's own
console is on (it prints the same as its last lines).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

from tdiag.terminal import output_console

__all__ = ["print_report_line", "report_line"]


def report_line(monitor: Any) -> str | None:
    """The line for a closed Monitor, or None when nothing should be printed."""
    from tdiag.monitor.sinks import ConsoleSink

    if not monitor.rank.is_main:
        return None
    if any(isinstance(s, ConsoleSink) and not s.quiet for s in monitor.sinks.sinks):
        return None  # the Monitor's console printed its own summary and "wrote …" lines
    run_dir = monitor.run_dir
    html = run_dir / "report.html"
    if html.is_file():
        return f"tdiag: report at {html} (run folder {run_dir})"
    if not (run_dir / "history.jsonl").is_file():
        return None  # nothing written (a run folder that could not be written was warned)
    return f"tdiag: run recorded in {run_dir}; no report.html: `tdiag report {run_dir}` builds it"


def print_report_line(monitor: Any, console: Any = None) -> None:
    """Print :func:`report_line` to ``console`` (default: stderr). Never raises an error
    of its own: a finished run must not fail on its last message."""
    try:
        line = report_line(monitor)
    except (AttributeError, OSError):  # a Monitor that never opened, an unreadable folder
        return
    if line is not None:
        (console or output_console(stderr=True)).print(Text(line), highlight=False, soft_wrap=True)

"""The comparison page (compare.html) and JSON (compare.json), and ``tdiag compare``.

The analysis is :func:`tdiag.report.compare.compare_runs`; this module draws the curves of
every run overlaid (with the chart renderer of :mod:`tdiag.report.charts`), renders
``templates/compare.html.j2`` (jinja2, autoescaped: run names, config values and finding
text from the runs are escaped; chart data is JSON with ``<``, ``>``, ``&`` escaped), and
writes both files atomically. The CSP is the report's: scripts and the style block by
hash only, nothing from the network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tdiag.report.compare import COMPARE_JSON, LOSS, RunData, x_values

__all__ = ["COMPARE_HTML", "build_compare", "compare_charts", "compare_command", "render_compare"]

COMPARE_HTML = "compare.html"

# (key, title, metric, y label, log y, from zero)
_CHARTS = (
    ("loss", "Training loss", LOSS, "loss (nats)", False, False),
    ("val-loss", "Validation loss", "val/loss", "loss (nats)", False, False),
    ("lr", "Learning rate", "train/lr", "learning rate", True, False),
    ("grad-norm", "Gradient norm", "train/grad_norm", "norm (before clipping)", True, False),
    ("throughput", "Throughput", "perf/tokens_per_sec", "tokens / s", False, True),
    ("step-time", "Step time", "perf/step_time", "seconds", False, True),
    ("gpu-mem", "GPU memory (peak)", "sys/gpu_mem_peak_gb", "GB", False, True),
    ("rss", "Process memory (RSS)", "sys/rss_gb", "GB", False, True),
)

_CSS = """
.table-wrap { overflow-x: auto; }
.table-wrap > table.cmp { min-width: 520px; }
table.cmp { border-collapse: collapse; width: 100%; font-size: 0.88rem; background: #fff; }
table.cmp th, table.cmp td { border-top: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
table.cmp th { color: var(--muted); font-weight: 600; }
table.cmp td + td, table.cmp th + th { white-space: nowrap; overflow-wrap: normal; }
table.cmp td:first-child { min-width: 170px; }
table.cmp.diff td { font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.swatch.c0 { background: #1f77b4; } .swatch.c1 { background: #d62728; } .swatch.c2 { background: #2ca02c; } .swatch.c3 { background: #9467bd; }
.swatch.c4 { background: #ff7f0e; } .swatch.c5 { background: #17becf; } .swatch.c6 { background: #8c564b; } .swatch.c7 { background: #e377c2; }
ul.fdiff li { margin: 4px 0; overflow-wrap: anywhere; }
"""


def _page_css() -> str:
    from importlib import resources

    try:
        base = resources.files("tdiag.report").joinpath("assets", "report.css").read_text("utf-8")
    except (FileNotFoundError, OSError):  # the report's stylesheet is optional here
        base = ""
    return base + "\n" + _CSS


def compare_charts(
    runs: Sequence[RunData], info: Mapping[str, Any], *, max_points: int = 2000
) -> list[Any]:
    """The overlaid curves of the runs (one chart per metric that some run logged), the
    separation of each run's loss from the first run's marked on the loss chart."""
    from tdiag.report import analyses as an
    from tdiag.report.charts import Mark, Series, line_chart

    axis, tps = info["axis"], [r.get("tokens_per_step") for r in info["runs"]]
    charts = []
    for key, title, metric, ylabel, logy, zero in _CHARTS:
        series = []
        for run, t in zip(runs, tps, strict=True):
            s = an.metric(run.df, metric, finite=False)
            if len(s) == 0:
                continue
            x = x_values(run, s, axis, t)
            series.append(
                Series(metric, x, s.to_numpy(), run=run.name, smooth=key == "loss",
                       points=key == "val-loss")
            )  # fmt: skip
        if not series:
            continue
        marks = []
        if key == "loss":
            for sep in info["loss_separation"]:
                if sep.get("step") is not None:
                    label = f"{sep['b']} separates"
                    marks.append(Mark(step=int(sep["step"]), label=label, color="#6a1b9a"))
        note = f"{len(series)} of {len(runs)} runs logged {metric}"
        if axis == "tokens":
            note += "; x: tokens seen (the runs' tokens per step differ)"
        charts.append(
            line_chart(key, title, series, ylabel=ylabel, logy=logy, from_zero=zero,
                       marks=marks, note=note, xlabel=axis, max_points=max_points)
        )  # fmt: skip
    return charts


def _fmt(v: Any) -> str:
    from tdiag.report.render_html import format_evidence

    if isinstance(v, Mapping) and v.get("absent") is True:
        return "(absent)"
    if v is None:
        return "—"
    return format_evidence(v)


def _sentence(sep: Mapping[str, Any]) -> str:
    unit = "tokens" if sep.get("axis") == "tokens" else "step"
    if sep.get("reason"):
        return f"{sep['b']} against {sep['a']}: not compared ({sep['reason']})."
    if sep.get("step") is None:
        return (
            f"{sep['b']} and {sep['a']}: the loss curves never separate beyond their noise "
            f"(largest difference {_fmt(sep.get('max_z'))}× the threshold "
            f"{_fmt(sep.get('threshold'))} nats, over {sep.get('points')} points)."
        )
    where = f"at {unit} {_fmt(sep['step'])}" if unit == "step" else f"at {_fmt(sep['step'])} tokens"
    side = "higher" if (sep.get("diff") or 0) > 0 else "lower"
    return (
        f"{sep['b']} leaves {sep['a']} {where}: its smoothed loss {side} by "
        f"{_fmt(abs(sep['diff']))} nats (threshold {_fmt(sep['threshold'])})."
    )


def _report_href(run: Mapping[str, Any], out_dir: Path) -> str | None:
    from tdiag.report.render_html import REPORT_HTML

    page = Path(run["folder"]) / REPORT_HTML
    if not page.exists():
        return None
    try:
        return Path(os.path.relpath(page, out_dir)).as_posix()
    except ValueError:  # another drive (Windows)
        return page.resolve().as_uri()


def render_compare(
    info: Mapping[str, Any], charts: Sequence[Any], *, out_dir: Path, refresh_s: int | None = None
) -> str:
    """The HTML page of a comparison (``info`` from :func:`compare_runs`)."""
    import jinja2

    from tdiag import __version__
    from tdiag.report.charts import chart_data_script, chart_figure, page_assets

    runs = [dict(r) for r in info["runs"]]
    for r in runs:
        r["final_loss"], r["min_loss"] = _fmt(r["final_loss"]), _fmt(r["min_loss"])
        r["report_href"] = _report_href(r, out_dir)
    diffs = {
        k: [{"key": d["key"], "values": [_fmt(v) for v in d["values"]]} for d in info[k]]
        for k in ("config_diff", "environment_diff")
    }
    findings = [
        {**f, "in_text": ", ".join(f["in"]), "not_in_text": ", ".join(f["not_in"])}
        for f in info["findings_diff"]
    ]
    perf = []
    for p in info["perf"]:
        cells = []
        for v, ratio in zip(p["values"], p["ratio_to_first"], strict=True):
            text = _fmt(v)
            if v is not None and ratio is not None and len(cells) > 0:
                text += f" ({ratio:.2f}×)"
            cells.append(text)
        perf.append({**p, "cells": cells})
    windows = sorted({s.get("window") for s in info["loss_separation"] if s.get("window")})
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tdiag.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    names = [r["name"] for r in runs]
    return env.get_template("compare.html.j2").render(
        version=__version__,
        title=" vs ".join(names) if len(names) <= 4 else f"{names[0]} and {len(names) - 1} more",
        axis=info["axis"],
        runs=runs,
        separations=[{"sentence": _sentence(s)} for s in info["loss_separation"]],
        window_text=", ".join(str(w) for w in windows) or "?",
        config_diff=diffs["config_diff"],
        environment_diff=diffs["environment_diff"],
        any_config=any(r.get("has_config") for r in runs),
        any_environment=any(r.get("has_environment") for r in runs),
        findings_diff=findings,
        perf=perf,
        figures=[chart_figure(c) for c in charts],
        chart_data=chart_data_script(charts),
        assets=page_assets(extra_css=_page_css()),
        refresh_s=refresh_s,
    )


def build_compare(
    run_dirs: Sequence[str | Path], out: str | Path, *, names: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[Path]]:
    """Read the runs, compare them, write ``out/compare.json`` and ``out/compare.html``.

    Returns:
        (compare.json object, [written paths]).

    Raises:
        HistoryReadError: a run cannot be read (the message names it).
        ValueError: fewer than two runs.
        OSError: ``out`` cannot be written.
    """
    from tdiag.history import write_json_atomic, write_text_atomic
    from tdiag.report.compare import compare_runs, load_run, unique_names

    if len(run_dirs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(run_dirs)}")
    runs = [load_run(p) for p in run_dirs]
    for run, name in zip(runs, unique_names(names or [r.name for r in runs]), strict=True):
        run.name = name
    info = compare_runs(runs)
    out_dir = Path(out)
    html = render_compare(info, compare_charts(runs, info), out_dir=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / COMPARE_JSON, out_dir / COMPARE_HTML
    write_json_atomic(json_path, info)
    write_text_atomic(html_path, html)
    return info, [json_path, html_path]


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    """Where a comparison goes by default: ``<first run's parent>/compare``."""
    first = Path(run_dirs[0])
    folder = first if first.is_dir() else first.parent
    return folder.parent / "compare"


def compare_command(run_dirs: Sequence[Path], *, out: Path | None, json_out: bool) -> int:
    """``tdiag compare``: exit 0, or 2 when a run cannot be read or the page not written.

    With ``json_out`` compare.json is printed to stdout (and nothing else is); otherwise
    one line names the page. Messages about failures go to stderr.
    """
    import json
    import sys

    from tdiag.findings import to_jsonable
    from tdiag.history import HistoryReadError

    if len(run_dirs) < 2:
        sys.stderr.write(f"tdiag compare: give at least two run folders, got {len(run_dirs)}\n")
        return 2
    target = out if out is not None else default_out(run_dirs)
    try:
        info, written = build_compare(run_dirs, target)
    except HistoryReadError as exc:
        sys.stderr.write(f"tdiag compare: cannot read a run: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"tdiag compare: cannot write the comparison: {exc}\n")
        return 2
    if json_out:
        sys.stdout.write(json.dumps(to_jsonable(info), indent=2, allow_nan=False) + "\n")
    else:
        sys.stdout.write(f"comparison of {len(run_dirs)} runs written to {written[1]}\n")
    return 0


def link_hook(target: Path, page_dir: Path, others: Sequence[str]) -> Any:
    """An ``html_hook`` for :func:`tdiag.report.build_report` that puts a link to the
    comparison page ``target`` at the top of a run's report (in ``page_dir``)."""
    from markupsafe import Markup

    href = Path(os.path.relpath(target, page_dir)).as_posix()
    names = ", ".join(others)
    nav = Markup(
        '\n<p class="muted" id="compare-link">Compared with {names}: <a href="{href}">{page}</a></p>'
    ).format(names=names, href=href, page=COMPARE_HTML)

    def hook(html: str) -> str:
        cut = html.find("<main>")
        if cut < 0:
            return html
        cut += len("<main>")
        return html[:cut] + str(nav) + html[cut:]

    # Markup.format escapes the names and the href
    return hook


def reports_command(
    run_dirs: Sequence[Path], *, json_out: bool, out: Path | None, fail_on: str | None
) -> int:
    """``tdiag report RUN_A RUN_B …``: each run's report (in its folder, or ``out/<name>``),
    then their comparison (``out/compare``, default ``<first run's parent>/compare``) that
    each report links to. Exit 0; 1 when ``--fail-on`` is met by a run; 2 when a run cannot
    be read or a page not written (the other runs' reports are still written).
    With ``json_out``: ``{"reports": [report.json…], "compare": compare.json}`` on stdout.
    """
    import json
    import sys

    from tdiag.findings import to_jsonable
    from tdiag.history import HistoryReadError
    from tdiag.report import FAIL_ON, _fails, _locate, build_report
    from tdiag.report.compare import unique_names

    if fail_on is not None:
        fail_on = fail_on.strip().lower()
        if fail_on not in FAIL_ON:
            sys.stderr.write(
                f"tdiag report: --fail-on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}\n"
            )
            return 2
    target_dir = (out / "compare") if out is not None else default_out(run_dirs)
    target = target_dir / COMPARE_HTML
    readable, readable_names, reports, code = [], [], [], 0
    folders = []
    for path in run_dirs:
        try:
            folders.append(_locate(Path(path))[1])
        except HistoryReadError as exc:
            sys.stderr.write(f"tdiag report: cannot read the run at {path}: {exc}\n")
            folders.append(None)
            code = 2
    names = unique_names([Path(p).name or str(p) for p in run_dirs])
    for path, folder, name in zip(run_dirs, folders, names, strict=True):
        if folder is None:
            continue
        page_dir = (out / name) if out is not None else folder
        others = [n for n, f in zip(names, folders, strict=True) if f is not None and n != name]
        try:
            report = build_report(path, page_dir, html_hook=link_hook(target, page_dir, others))
        except HistoryReadError as exc:
            sys.stderr.write(f"tdiag report: cannot read the run at {path}: {exc}\n")
            code = 2
            continue
        except OSError as exc:
            sys.stderr.write(f"tdiag report: cannot write the report of {path}: {exc}\n")
            code = 2
            continue
        readable.append(path)
        readable_names.append(name)
        reports.append(report)
        if not json_out:
            s = report.get("summary") or {}
            sys.stdout.write(
                f"{name}: {s.get('errors', 0)} errors, {s.get('warnings', 0)} warnings, "
                f"{s.get('infos', 0)} infos -> {page_dir / 'report.html'}\n"
            )
    info: dict[str, Any] | None = None
    if len(readable) >= 2:
        try:
            info, _ = build_compare(readable, target_dir, names=readable_names)
        except (HistoryReadError, OSError) as exc:
            sys.stderr.write(f"tdiag report: cannot write the comparison: {exc}\n")
            code = 2
        else:
            if not json_out:
                sys.stdout.write(f"comparison -> {target}\n")
    if json_out:
        obj = {"reports": reports, "compare": info}
        sys.stdout.write(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    if code:
        return code
    return 1 if any(_fails(r, fail_on) for r in reports) else 0

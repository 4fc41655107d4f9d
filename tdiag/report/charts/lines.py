"""Line charts: a spec of named series on one shared x, drawn by uPlot in the page.

:func:`line_chart` is the public builder (the report's charts and ``tdiag compare`` use it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tdiag.report.charts.data import align_series, default_smoothing, map_axis, thin_marks
from tdiag.report.charts.marks import marks_json
from tdiag.report.charts.model import Chart, Mark, Series

__all__ = ["PALETTE", "line_chart"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
_DASHES = ((), (6, 3), (2, 2), (8, 3, 2, 3))
AXIS_LABELS = {"step": "step", "tokens": "tokens", "time": "wall-clock (s since start)"}


def _colors(series: Sequence[Series]) -> list[tuple[str, tuple[int, ...]]]:
    """One colour per series; with run labels one colour per run, a dash per name in it."""
    runs = list(dict.fromkeys(s.run for s in series if s.run is not None))
    if not runs:
        return [(PALETTE[i % len(PALETTE)], ()) for i in range(len(series))]
    names = list(dict.fromkeys(s.name for s in series))
    out = []
    for s in series:
        color = PALETTE[runs.index(s.run) % len(PALETTE)] if s.run is not None else "#555555"
        out.append((color, _DASHES[names.index(s.name) % len(_DASHES)]))
    return out


def line_chart(
    key: str,
    title: str,
    series: Sequence[Series],
    *,
    ylabel: str = "",
    lower_label: str = "",
    logy: bool = False,
    from_zero: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
    marks: Sequence[Mark] = (),
    note: str = "",
    xlabel: str = "step",
    axes: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    max_points: int = 2000,
    smoothing: float | None = None,
    metrics: Sequence[str] | None = None,
    x_range: tuple[float, float] | None = None,
) -> Chart:
    """A chart of named series (of one run, or of several runs overlaid).

    Each series is downsampled to at most ``max_points`` points with its per-bucket minimum
    and maximum kept (spikes stay), then all are put on one sorted x (the union of their
    steps; a series without a point at some x is not broken there). NaN/Inf points are left
    out of the line; for a series with ``nonfinite_label`` their steps are marked.

    Args:
        key: stable short name, unique on the page (the anchor is ``chart-<key>``).
        title: heading shown above the chart.
        series: the curves; ``panel=1`` puts one in a shorter panel below the main one.
        ylabel: the main panel's y-axis label (with its unit).
        lower_label: the lower panel's y-axis label.
        logy: start with a log y axis (the reader can toggle it on every chart).
        from_zero: start the linear y axis at 0 (quantities >= 0 such as memory).
        hlines: horizontal lines on the main panel, ``(y, label)`` (clip threshold …).
        marks: numbered finding marks (see :func:`tdiag.report.charts.marks_by_chart`).
        note: caption under the chart.
        xlabel: the x-axis label of ``Series.steps`` ("step"; "tokens" when a comparison
            overlays runs of different batch sizes by tokens).
        axes: other x axes the reader may switch to, ``name -> (steps, values)`` (e.g.
            ``{"tokens": (steps, cumulative_tokens), "time": (steps, seconds)}``),
            interpolated at the chart's steps; keys "tokens" and "time" get their labels.
        max_points: downsampling budget per series (>= 4).
        smoothing: the smoothing slider's start (0–0.999) for series with ``smooth``; by
            default chosen from the number of points (:func:`default_smoothing`).
        metrics: the history columns drawn (for the header), default the series names.
        x_range: the initial x range on the ``xlabel`` axis (default: the chart's own data);
            the report gives every chart the run's first to last step, so they line up.

    Returns:
        A :class:`Chart` whose ``spec`` the page's script draws.

    Raises:
        ValueError: a series whose steps and values differ in length, or no series.
    """
    if not series:
        raise ValueError(f"chart {key!r} has no series")
    for s in series:
        if len(s.steps) != len(s.values):
            raise ValueError(
                f"series {s.name!r} of chart {key!r}: {len(s.steps)} steps but "
                f"{len(s.values)} values"
            )
    x, ys, totals = align_series(
        [np.asarray(s.steps, dtype=np.float64) for s in series],
        [np.asarray(s.values, dtype=np.float64) for s in series],
        max_points,
    )
    xs: dict[str, Any] = {xlabel: x}
    for name, (ref_steps, ref_values) in (axes or {}).items():
        mapped = map_axis(x, ref_steps, ref_values)
        if mapped is not None and name != xlabel and bool(np.all(np.diff(mapped) >= 0)):
            xs[name] = mapped  # only an ascending axis (a counter reset on resume is not)
    out_series, nonfinite = [], []
    for s, y, total, (color, dash) in zip(series, ys, totals, _colors(series), strict=True):
        label = f"{s.run} · {s.name}" if s.run is not None else s.name
        out_series.append(
            {
                "label": label,
                "values": y,
                "color": color,
                "dash": list(dash),
                "panel": 1 if s.panel else 0,
                "smooth": bool(s.smooth),
                "points": bool(s.points) or total < 3,
                "total": total,
            }
        )
        if s.nonfinite_label:
            steps = np.asarray(s.steps, dtype=np.float64)
            values = np.asarray(s.values, dtype=np.float64)
            bad = thin_marks(steps[~np.isfinite(values)])
            if len(bad):
                nonfinite.append({"label": s.nonfinite_label, "steps": bad, "color": "#b71c1c"})
    smoothed = any(s.smooth for s in series)
    if smoothed and smoothing is None:
        smoothing = default_smoothing(len(x))
    panels = [{"label": ylabel, "log": bool(logy), "zero": bool(from_zero)}]
    if any(s.panel for s in series):
        panels.append({"label": lower_label, "log": False, "zero": True})
    spec = {
        "kind": "lines",
        "key": key,
        "title": title,
        "x": xs,
        "base": xlabel,
        "xrange": [float(x_range[0]), float(x_range[1])] if x_range else None,
        "xlabels": {k: AXIS_LABELS.get(k, k) for k in xs},
        "series": out_series,
        "panels": panels,
        "hlines": [{"y": float(y), "label": label} for y, label in hlines],
        "marks": marks_json(marks),
        "nonfinite": nonfinite,
        "smoothing": smoothing if smoothed else None,
        "downsampled": any(t > max_points for t in totals),
    }
    names = tuple(metrics) if metrics is not None else tuple(dict.fromkeys(s.name for s in series))
    return Chart(key=key, title=title, metrics=names, spec=spec, note=note)

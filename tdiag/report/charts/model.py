"""What a chart is on the Python side: a key, a title and a JSON spec that the page draws.

The page carries every chart's spec in one ``<script type="application/json">`` block and
draws it with uPlot (lines) or a canvas (heatmaps) — see ``tdiag/report/assets/charts.js``.
This module defines the dataclasses and turns numbers into compact, HTML-safe JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from markupsafe import Markup

__all__ = ["Chart", "Mark", "Series", "chart_data_script", "dumps_spec"]


@dataclass(frozen=True)
class Series:
    """One named curve: ``values[i]`` at ``steps[i]``.

    Attributes:
        name: the label in the legend and the CSV header (a metric, a layer, a run …).
        steps: the x values (steps, or tokens/seconds when the chart's x label says so).
        values: the y values; NaN/Inf are allowed (drawn as gaps, listed as non-finite marks
            when ``nonfinite_label`` is set).
        run: a run label for comparisons: series of one run share a colour family and the
            legend says ``run · name``; None for a single run.
        panel: 0 for the main panel, 1 for the shorter panel below (MFU under tokens/s).
        smooth: draw a debiased-EMA line over the raw points (the smoothing slider acts on it).
        points: draw dots (validation loss: few points, each one matters).
        nonfinite_label: when set, steps where the value is NaN/Inf are marked with crosses
            along the top of the chart under this legend label ("non-finite loss").
    """

    name: str
    steps: Sequence[float] | np.ndarray
    values: Sequence[float] | np.ndarray
    run: str | None = None
    panel: int = 0
    smooth: bool = False
    points: bool = False
    nonfinite_label: str | None = None


@dataclass(frozen=True)
class Mark:
    """A finding's place on a chart: a vertical line at ``step`` (a band to ``end``).

    Only the ``primary`` mark of a finding carries its number; its other steps are drawn
    fainter and unlabelled.
    """

    step: int
    label: str
    color: str
    end: int | None = None
    primary: bool = True


@dataclass(frozen=True)
class Chart:
    """One chart of a report page.

    Attributes:
        key: stable short name ("loss", "grad-norm", …); the HTML anchor is ``chart-<key>``.
        title: heading shown above the chart.
        metrics: the history columns drawn.
        spec: the JSON-able description the page's script draws (kind, x axes, series,
            panels, threshold lines, finding marks, non-finite marks, default smoothing).
        note: a short caption (rows, downsampling, clip threshold source …).
    """

    key: str
    title: str
    metrics: tuple[str, ...]
    spec: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def anchor(self) -> str:
        return "chart-" + self.key

    @property
    def kind(self) -> str:
        return str(self.spec.get("kind", "lines"))

    @property
    def metrics_label(self) -> str:
        """The metrics drawn, short: per-layer families as ``grad_norm/* (38 series)``."""
        if len(self.metrics) <= 4:
            return ", ".join(self.metrics)
        prefix = self.metrics[0].rsplit("/", 1)[0]
        if all(m.startswith(prefix + "/") for m in self.metrics):
            return f"{prefix}/* ({len(self.metrics)} series)"
        return ", ".join(self.metrics[:4]) + f", … ({len(self.metrics)} series)"


# ---------------------------------------------------------------- JSON

_SIG = 6  # significant digits kept on the page (report.json keeps the full analyses)


def _array_json(a: np.ndarray) -> str:
    """A numeric array as a JSON list, 6 significant digits, NaN/Inf as null (the page knows
    non-finite steps from the spec's ``nonfinite`` lists)."""
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        return "[" + ",".join(map(str, a.tolist())) + "]"
    a = a.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if finite.all():
        ints = a == np.round(a)
        if ints.all() and (np.abs(a) < 2**53).all():
            return "[" + ",".join(map(str, a.astype(np.int64).tolist())) + "]"
    text = np.char.mod(f"%.{_SIG}g", np.where(finite, a, 0.0))
    text = np.where(finite, text, "null")
    return "[" + ",".join(text.tolist()) + "]"


def _encode(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return _array_json(obj)
    if isinstance(obj, Mapping):
        return "{" + ",".join(json.dumps(str(k)) + ":" + _encode(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(_encode(v) for v in obj) + "]"
    if isinstance(obj, float):
        return json.dumps(obj) if math.isfinite(obj) else "null"
    if isinstance(obj, np.generic):
        return _encode(obj.item())
    return json.dumps(obj)


def dumps_spec(obj: Any) -> str:
    """Strict JSON text of a spec (numpy arrays compact, NaN as null), safe to inline in a
    ``<script type="application/json">``: ``<``, ``>`` and ``&`` are written as ``\\u003c``…
    so no run, metric or module name can close the script element or open a comment."""
    text = _encode(obj)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def chart_data_script(charts: Sequence[Chart], *, element_id: str = "tdiag-charts") -> Markup:
    """The ``<script type="application/json">`` block holding every chart's spec.

    The page's script reads it by id and draws each spec into the element whose
    ``data-tdiag-chart`` attribute is the chart's key. JSON data blocks are not executed,
    so they need no CSP hash.
    """
    body = dumps_spec({c.key: c.spec for c in charts})
    return Markup('<script type="application/json" id="{}">{}</script>').format(
        element_id, Markup(body)
    )

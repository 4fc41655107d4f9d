"""Charts of report pages: specs built in Python, drawn in the page from embedded data.

Python turns a run's history into :class:`Chart` objects whose ``spec`` is plain JSON
(downsampled series on a shared x, panels, threshold lines, finding marks, non-finite
marks, heatmap grids); the page embeds all specs in one ``<script type="application/json">``
block and draws them with uPlot (vendored, inline, MIT) and ``assets/charts.js``: hover with
step and value, drag to zoom (double-click resets), log-scale toggle, smoothing slider
(TensorBoard's debiased EMA), series toggles (click a legend entry), x axis by step, tokens
or wall-clock, and CSV export of a chart's data. Nothing is fetched: the CSP allows the
inline scripts and style by hash only.

Public interface (also for other pages, e.g. ``tdiag compare``)::

    from tdiag.report.charts import Series, line_chart, chart_data_script, page_assets

    charts = [
        line_chart(
            "loss", "Training loss",
            [Series("train/loss", steps_a, loss_a, run="baseline", smooth=True),
             Series("train/loss", steps_b, loss_b, run="lr-2x", smooth=True)],
            ylabel="loss (nats)",
        ),
    ]
    assets = page_assets(extra_css=my_page_css)   # one style block, hashed
    # in a jinja2 template (autoescape on):
    #   <meta http-equiv="Content-Security-Policy" content="{{ assets.csp }}">
    #   {{ assets.style }}                       (in <head>)
    #   {% for c in charts %}{{ chart_figure(c) }}{% endfor %}
    #   {{ chart_data_script(charts) }}          (then, at the end of <body>)
    #   {{ assets.scripts }}

- :func:`line_chart` — named series (steps, values, optional run label) to a :class:`Chart`.
- :func:`chart_figure` — the ``<figure>`` a chart is drawn into (title, controls, caption).
- :func:`chart_data_script` — the JSON block with every chart's spec (``<``, ``>``, ``&``
  escaped: hostile names stay inert).
- :func:`page_assets` — the ``<style>``/``<script>`` blocks and the CSP string with hashes.
- :func:`build_charts` — every chart of one run's report from its history DataFrame.
"""

from __future__ import annotations

from tdiag.report.charts.assets import PageAssets, page_assets
from tdiag.report.charts.build import build_charts
from tdiag.report.charts.data import bucket_envelope, debiased_ema, minmax_indices
from tdiag.report.charts.figure import chart_figure
from tdiag.report.charts.lines import line_chart
from tdiag.report.charts.marks import (
    FINDING_CHARTS,
    SEVERITY_COLORS,
    chart_keys_for_finding,
    clip_threshold,
    finding_span,
    finding_steps,
    marks_by_chart,
)
from tdiag.report.charts.model import Chart, Mark, Series, chart_data_script, dumps_spec

__all__ = [
    "FINDING_CHARTS",
    "SEVERITY_COLORS",
    "Chart",
    "Mark",
    "PageAssets",
    "Series",
    "bucket_envelope",
    "build_charts",
    "chart_data_script",
    "chart_figure",
    "chart_keys_for_finding",
    "clip_threshold",
    "debiased_ema",
    "dumps_spec",
    "finding_span",
    "finding_steps",
    "line_chart",
    "marks_by_chart",
    "minmax_indices",
    "page_assets",
]

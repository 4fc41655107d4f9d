"""The HTML container of one chart; the page's script draws into it and adds the controls."""

from __future__ import annotations

from markupsafe import Markup

from tdiag.report.charts.model import Chart

__all__ = ["chart_figure"]


def chart_figure(chart: Chart, *, after: Markup | str = "") -> Markup:
    """``<figure class="chart" id="chart-<key>">`` with the title, the metrics drawn, the box
    the script draws into (``data-tdiag-chart``), a no-script fallback line and the caption.

    Args:
        chart: the chart (its text is escaped here).
        after: markup appended inside the figure (e.g. links to the findings marked on it);
            a plain ``str`` is escaped.
    """
    return Markup(
        '<figure class="chart" id="{anchor}" data-kind="{kind}">'
        '<div class="bar"><h3>{title}</h3><span class="muted">{metrics}</span></div>'
        '<div class="plot" data-tdiag-chart="{key}">'
        '<noscript><p class="muted">Charts are drawn by the page\'s script; the numbers are in '
        "report.json.</p></noscript></div>"
        '<figcaption class="muted">{note}</figcaption>{after}</figure>'
    ).format(
        anchor=chart.anchor,
        kind=chart.kind,
        title=chart.title,
        metrics=chart.metrics_label,
        key=chart.key,
        note=chart.note,
        after=after,
    )

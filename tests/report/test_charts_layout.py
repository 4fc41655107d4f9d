"""Chart layout: what a reader sees. Finding marks numbered once and never overlapping,
spans drawn as bands, legends below the data, axes that do not exaggerate, one-row runs
visible, the same step axis on every chart."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from tdiag.findings import Finding, Severity
from tdiag.report import charts as ch
from tdiag.report.charts import build_charts, finding_span


def history(n: int = 300) -> pd.DataFrame:
    steps = np.arange(1, n + 1)
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "step": steps,
            "train/loss": 3.0 * np.exp(-steps / 80) + 1.0 + 0.02 * rng.standard_normal(n),
            "train/lr": np.minimum(1.0, steps / 20) * 1e-3,
            "train/grad_norm": 1.0 + 0.2 * rng.random(n),
            "train/grad_clip_frac": (rng.random(n) > 0.5).astype(float),
            "perf/tokens_per_sec": 1000.0 + 5 * rng.standard_normal(n),
            "perf/mfu": 0.3 + 0.001 * rng.standard_normal(n),
            "sys/gpu_mem_allocated_gb": np.full(n, 40.0),
            "sys/gpu_mem_reserved_gb": np.full(n, 50.0),
            "sys/gpu_mem_peak_gb": np.full(n, 60.0),
            "sys/rss_gb": np.full(n, 0.352) + 1e-4 * steps / n,
        }
    )


def finding(fid: str, step: int | None, number_sev=Severity.WARNING, **evidence) -> Finding:
    return Finding(id=fid, severity=number_sev, title=fid, step=step, evidence=evidence)


def _mark_labels(ax) -> list[str]:
    colors = set(ch.SEVERITY_COLORS.values()) | {"#333333"}
    return [t.get_text() for t in ax.texts if t.get_color() in colors]


def _extents(fig, artists):
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def test_a_finding_with_many_steps_is_numbered_once():
    df = history()
    f = finding("train.loss-spikes", 100, steps=[100, 120, 140, 160, 180, 200, 220])
    marks = ch._marks_by_chart([f], ["loss"])["loss"]
    assert [m.primary for m in marks] == [True] + [False] * 6
    fig = ch._loss_figure(df, df["step"].to_numpy(float), marks, 1000, False, None)
    (ax,) = fig.axes
    assert _mark_labels(ax) == ["1"]
    assert len([ln for ln in ax.lines if ln.get_linestyle() == "--"]) == 7  # every step drawn


def test_close_marks_merge_into_one_label_and_far_ones_do_not_overlap():
    df = history()
    fs = [
        finding("train.divergence", 150, Severity.ERROR),
        finding("train.lr-too-high", 152),
        finding("train.early-stop", 148, Severity.INFO),
        finding("train.plateau", 290),
        finding("train.overfitting", 20),
    ]
    marks = ch._marks_by_chart(fs, ["loss"])["loss"]
    fig = ch._loss_figure(
        df, df["step"].to_numpy(float), marks, 1000, False, ch._x_range(df["step"].to_numpy(float))
    )
    (ax,) = fig.axes
    labels = _mark_labels(ax)
    assert sorted(labels) == ["1,2,3", "4", "5"]
    texts = [t for t in ax.texts if t.get_text() in labels]
    for a, b in itertools.combinations(_extents(fig, texts), 2):
        assert not a.overlaps(b), (a, b)


def test_a_span_finding_is_a_shaded_band_with_one_number():
    f = finding("perf.data-stall", 30, step_range=[30, 300])
    assert finding_span(f) == (30, 300)
    assert finding_span(finding("perf.data-stall", 30, step_range=[1, "x"])) is None
    (mark,) = ch._marks_by_chart([f], ["step-time"])["step-time"]
    assert (mark.step, mark.end, mark.label) == (30, 300, "1")
    html_f = finding("perf.data-stall", 30, step_range=[30, 300], impact=0.5)
    from tdiag.report.render_html import _finding_views

    (view,) = _finding_views([html_f], [])
    assert view["evidence"][0] == ("steps judged", "30 – 300")
    assert view["impact"] == "0.50" and all(k != "impact" for k, _ in view["evidence"])


@pytest.mark.parametrize("key", ["grad-norm", "memory", "loss"])
def test_legend_sits_below_the_plot(key):
    df = history()
    meta = {"config": {"grad_clip": 1.0}, "environment": {"gpu_mem_total_gb": 80.0}}
    steps = df["step"].to_numpy(float)
    if key == "loss":
        fig = ch._loss_figure(df, steps, [], 1000, False, None)
    else:
        left = ch._present(df, steps, ch._SIMPLE[key][0], 1000)
        lower = ch._present(df, steps, ch._SIMPLE[key][1], 1000)
        fig = ch._lines_figure(left, [], lower=lower, hline=(1.0, "clip"))
    assert fig.legends, "several series: a legend"
    legend_box, *axes_boxes = _extents(fig, [fig.legends[0], *fig.axes])
    for box in axes_boxes:
        assert legend_box.y1 <= box.y0 + 1, (legend_box, box)  # below every panel
    legend_texts = _extents(fig, fig.legends[0].get_texts())
    assert max(b.x1 for b in legend_texts) <= fig.bbox.x1 + 1  # not cut off on the right
    svg_charts = {c.key: c for c in build_charts(df, meta, only=[key])}
    assert svg_charts[key].svg


def test_single_series_charts_have_no_legend_and_memory_starts_at_zero():
    df = history()
    (lr,) = build_charts(df, only=["lr"])
    assert '<g id="lr-legend' not in lr.svg
    steps = df["step"].to_numpy(float)
    rss = ch._present(df, steps, ["sys/rss_gb"], 1000)
    fig = ch._lines_figure(rss, [], from_zero=True)
    assert not fig.legends and fig.axes[0].get_ylim()[0] == 0.0  # a flat 0.352 GB stays flat


def test_throughput_and_mfu_on_separate_panels_sharing_steps():
    df = history()
    steps = df["step"].to_numpy(float)
    fig = ch._lines_figure(
        ch._present(df, steps, ["perf/tokens_per_sec"], 1000), [],
        lower=ch._present(df, steps, ["perf/mfu"], 1000), xlim=(0, 310),
    )  # fmt: skip
    top, bottom = fig.axes
    assert top.get_xlim() == bottom.get_xlim() == (0, 310)
    assert bottom.get_ylim()[0] == 0.0


def test_every_chart_shares_the_step_axis():
    df = history()
    df["val/loss"] = np.where(df["step"] % 50 == 0, 1.5, np.nan)
    df.loc[df["step"] > 100, "train/grad_norm"] = np.nan  # a metric that stopped early
    xlim = ch._x_range(df["step"].to_numpy(float))
    assert xlim is not None and xlim[0] < 1 and xlim[1] > 300
    assert ch._x_range(np.array([5.0])) is None


def test_a_one_row_history_is_drawn_with_markers():
    df = pd.DataFrame({"step": [1], "train/loss": [3.0], "train/lr": [1e-3]})
    charts = {c.key: c for c in build_charts(df)}
    assert set(charts) == {"loss", "lr"}
    for chart in charts.values():
        assert "<use" in chart.svg, chart.key  # a marker, not an invisible one-point line


def test_titles_and_capacity_name_only_what_is_drawn():
    df = history()
    cpu = df[["step"]].assign(**{"sys/cpu_percent": 50.0})
    (util,) = build_charts(cpu, only=["utilization"])
    assert util.title == "CPU utilisation"
    meta = {"environment": {"gpu_mem_total_gb": 80.0}}
    (mem,) = build_charts(df, meta, only=["memory"])
    assert "GPU capacity 80 GB" in mem.svg and "capacity" in mem.note
    (mem_no_cap,) = build_charts(df, {}, only=["memory"])
    assert "capacity" not in mem_no_cap.svg


def test_layer_heatmap_has_no_empty_columns_from_rows_without_layers():
    n = 200
    steps = np.arange(1, n + 1) * 5
    df = pd.DataFrame({"step": steps})
    for i in range(12):
        df[f"grad_norm/blocks.{i}"] = 0.1 * (i + 1) * np.ones(n)
    val = pd.DataFrame({"step": steps[::10], "val/loss": 2.0})  # eval rows in between
    df = pd.concat([df, val]).sort_values("step", kind="stable").reset_index(drop=True)
    cols = [c for c in df.columns if c.startswith("grad_norm/")]
    fig = ch._heatmap_figure(df, cols, "grad_norm/", df["step"].to_numpy(float), [], 1000)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (12, n)  # one column per row that carries the layers
    assert not np.ma.getmaskarray(grid).all(axis=0).any()

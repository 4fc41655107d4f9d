"""Chart data: shape-preserving downsampling, TensorBoard's debiased EMA, compact HTML-safe
JSON, and the public line-chart builder other pages (tdiag compare) use."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tdiag.report.charts import (
    Series,
    build_charts,
    chart_data_script,
    debiased_ema,
    dumps_spec,
    line_chart,
    minmax_indices,
    page_assets,
)
from tdiag.report.charts.data import default_smoothing


def naive_minmax(y: np.ndarray, buckets: int) -> set[int]:
    size = math.ceil(len(y) / buckets)
    keep = {0, len(y) - 1}
    for start in range(0, len(y), size):
        chunk = [(v, i) for i, v in enumerate(y[start : start + size], start) if np.isfinite(v)]
        if chunk:
            keep.add(min(chunk)[1])
            keep.add(max(chunk, key=lambda t: (t[0], -t[1]))[1])
        else:
            keep.add(start)
    return keep


def test_minmax_indices_match_a_naive_loop_and_keep_spikes():
    rng = np.random.default_rng(3)
    y = rng.standard_normal(100_003)
    y[51_234] = 80.0  # one-step spike up
    y[7_001] = -60.0  # and down
    y[20_000:20_500] = np.nan  # a stretch of NaN
    idx = minmax_indices(y, 2000)
    assert set(idx.tolist()) == naive_minmax(y, 1000)
    assert len(idx) <= 2002 and np.all(np.diff(idx) > 0)
    assert {51_234, 7_001, 0, len(y) - 1} <= set(idx.tolist())
    assert minmax_indices(y[:50], 2000).tolist() == list(range(50))  # short: whole
    with pytest.raises(ValueError, match="max_points must be >= 4, got 2"):
        minmax_indices(y, 2)


def naive_tensorboard_ema(values, weight):
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight**n))
    return out


def test_debiased_ema_is_tensorboards_and_starts_on_the_data():
    steps = np.arange(1, 201)
    loss = 4.0 * np.exp(-steps / 30) + 1.0 + 0.05 * np.sin(steps)
    loss[50] = np.nan
    got = debiased_ema(loss, 0.9)
    np.testing.assert_allclose(got, naive_tensorboard_ema(loss.tolist(), 0.9), equal_nan=True)
    assert got[0] == loss[0] and math.isnan(got[50])
    # While the loss falls, an EMA started at the first value sits above every raw point
    # (the bug of the old chart); the debiased one stays inside the range seen so far.
    biased = pd.Series(loss).ewm(alpha=0.1, adjust=False).mean().to_numpy()
    assert (biased[1:10] > loss[1:10]).all()
    assert all(got[i] <= max(loss[: i + 1]) for i in range(1, 10))
    assert (got[1:10] < biased[1:10]).all()
    np.testing.assert_array_equal(debiased_ema(loss, 0.0), loss)
    with pytest.raises(ValueError, match="weight must be in"):
        debiased_ema(loss, 1.0)


def test_default_smoothing_grows_with_points_within_bounds():
    assert default_smoothing(10) == 0.6
    assert 0.9 < default_smoothing(2000) < 0.99
    assert default_smoothing(10**7) == 0.99


def test_spec_json_is_strict_compact_and_html_safe():
    spec = {
        "name": "</script><!-- & >",
        "values": np.array([1.0, np.nan, np.inf, 1 / 3, 1e-12]),
        "steps": np.array([1, 2, 3]),
        "whole": np.array([1.0, 2.0]),
        "x": math.nan,
    }
    text = dumps_spec(spec)
    assert "<" not in text and ">" not in text and "&" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert back["name"] == "</script><!-- & >"
    assert back["values"] == [1.0, None, None, 0.333333, 1e-12]
    assert back["steps"] == [1, 2, 3] and back["whole"] == [1, 2] and back["x"] is None
    block = str(chart_data_script([]))
    assert block == '<script type="application/json" id="tdiag-charts">{}</script>'


def test_line_chart_overlays_runs_on_one_x():
    a = Series("train/loss", [0, 10, 20, 30], [3.0, 2.0, 1.5, 1.2], run="base", smooth=True)
    b = Series("train/loss", [0, 15, 30], [3.1, 2.5, 2.0], run="lr-2x", smooth=True)
    val = Series("val/loss", [30], [1.4], run="base", points=True)
    chart = line_chart("cmp-loss", "Loss", [a, b, val], ylabel="loss (nats)")
    s = chart.spec
    assert s["x"]["step"].tolist() == [0, 10, 15, 20, 30]
    labels = [x["label"] for x in s["series"]]
    assert labels == ["base · train/loss", "lr-2x · train/loss", "base · val/loss"]
    rows = [np.asarray(x["values"]).tolist() for x in s["series"]]
    assert rows[1][0] == 3.1 and math.isnan(rows[1][1]) and rows[1][2] == 2.5
    colors = [x["color"] for x in s["series"]]
    assert colors[0] == colors[2] != colors[1]  # one colour per run
    assert s["series"][2]["dash"] and not s["series"][0]["dash"]  # a dash per metric
    assert chart.metrics == ("train/loss", "val/loss") and s["smoothing"] is not None
    with pytest.raises(ValueError, match="3 steps but 2 values"):
        line_chart("x", "x", [Series("bad", [1, 2, 3], [1.0, 2.0])])
    with pytest.raises(ValueError, match="has no series"):
        line_chart("x", "x", [])


def test_page_assets_hash_what_they_inline():
    assets = page_assets(extra_css=".x { color: red; }")
    assert ".x { color: red; }" in assets.style and assets.style_hashes[0] in assets.csp
    assert all(h in assets.csp for h in assets.script_hashes) and len(assets.script_hashes) == 2
    assert page_assets().style_hashes != assets.style_hashes
    with pytest.raises(ValueError, match="closing style tag"):
        page_assets(extra_css="</style><script>")


def test_the_python_side_of_charts_is_linear_and_fast_enough_to_not_matter():
    """Not a timing assert: the page's data for 100k rows stays the size of 2k points."""
    n = 100_000
    steps = np.arange(n)
    df = pd.DataFrame({"step": steps, "train/loss": 1 + np.sin(steps / 500.0)})
    (chart,) = build_charts(df, only=["loss"])
    assert len(chart.spec["x"]["step"]) <= 2002
    assert len(dumps_spec(chart.spec)) < 60_000

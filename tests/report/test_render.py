"""Renderers of the report: summary numbers, downsampling, charts, HTML, JSON, console."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import io
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from tdiag.findings import Finding, Severity
from tdiag.report.charts import (
    bucket_envelope,
    build_charts,
    chart_keys_for_finding,
    clip_threshold,
    dumps_spec,
)
from tdiag.report.console import render_console
from tdiag.report.render_html import render_html
from tdiag.report.render_json import assemble_report, dumps_report
from tdiag.report.summary import format_duration, format_number, summarize


def history(
    n: int = 400, *, layers: tuple[str, ...] = ("blocks.0.mlp",), seed: int = 0
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    df = pd.DataFrame(
        {
            "step": steps,
            "time": 100.0 + 0.25 * steps,
            "train/loss": 3.0 * np.exp(-steps / (n / 4)) + 1.0 + 0.01 * rng.standard_normal(n),
            "train/lr": np.minimum(1.0, steps / 20) * 1e-3,
            "train/grad_norm": 1.0 + 0.1 * rng.random(n),
            "perf/tokens_per_sec": 1000.0 + 10 * rng.standard_normal(n),
            "perf/step_time": np.full(n, 0.5),
            "perf/mfu": np.full(n, 0.25),
            "sys/gpu_mem_peak_gb": np.linspace(10, 12, n),
        }
    )
    for name in layers:
        df[f"grad_norm/{name}"] = 0.5 + 0.01 * rng.random(n)
    df["val/loss"] = np.where(steps % 100 == 0, df["train/loss"] + 0.1, np.nan)
    return df


# ---------------------------------------------------------------- summary


def test_summary_matches_a_naive_computation():
    df = history(400)
    df.loc[df.index[-1], "train/loss"] = np.nan  # a NaN at the very end is the final value
    s = summarize(df)
    loss = df["train/loss"].tolist()
    finite = [(v, st) for v, st in zip(loss, df["step"], strict=True) if math.isfinite(v)]
    best, best_step = min(finite)
    assert s["steps"] == 400 and s["rows"] == 400 and s["first_step"] == 1
    assert math.isnan(s["final_train_loss"])
    assert s["best_train_loss"] == pytest.approx(best) and s["best_train_loss_step"] == best_step
    val = [(v, st) for v, st in zip(df["val/loss"], df["step"], strict=True) if not math.isnan(v)]
    assert s["final_val_loss"] == pytest.approx(val[-1][0])
    assert (
        s["best_val_loss"] == pytest.approx(min(val)[0]) and s["best_val_loss_step"] == min(val)[1]
    )
    assert s["wall_time_s"] == pytest.approx(0.25 * 399)
    assert s["mean_tokens_per_sec"] == pytest.approx(sum(df["perf/tokens_per_sec"]) / 400)
    assert s["peak_tokens_per_sec"] == pytest.approx(max(df["perf/tokens_per_sec"]))
    assert s["mean_mfu"] == pytest.approx(0.25) and s["peak_gpu_mem_gb"] == pytest.approx(12.0)
    assert s["tokens_estimated"] is True
    assert s["tokens"] == pytest.approx(sum(df["perf/tokens_per_sec"] * 0.5) / 400 * 400)
    df["train/tokens"] = df["step"] * 512.0  # a cumulative counter wins over the estimate
    s2 = summarize(df)
    assert s2["tokens"] == 400 * 512 and s2["tokens_estimated"] is False


def test_summary_steps_ignore_a_log_row_before_the_first_step():
    # mon.log({"val/loss": v}) before the first mon.step() (nanoGPT evaluates at iteration 0)
    train = pd.DataFrame({"step": np.arange(1, 302), "train/loss": np.linspace(5, 3, 301)})
    val = pd.DataFrame({"step": [0, 100, 200, 301], "val/loss": [5.5, 4.0, 3.5, 3.2]})
    s = summarize(pd.concat([val.iloc[:1], train, val.iloc[1:]], ignore_index=True))
    assert s["steps"] == 301 and s["first_step"] == 0 and s["last_step"] == 301
    zero_based = pd.DataFrame({"step": [0, 1, 2], "train/loss": [3.0, 2.0, float("nan")]})
    assert summarize(zero_based)["steps"] == 3  # a NaN loss row is a step too


def test_summary_of_a_sparse_history_has_nones():
    df = pd.DataFrame({"step": [0, 1, 2], "sys/rss_gb": [1.0, 2.0, 1.5]})
    s = summarize(df)
    assert s["steps"] == 3  # 0-based steps
    assert (
        s["final_train_loss"] is None and s["mean_tokens_per_sec"] is None and s["tokens"] is None
    )
    assert s["peak_rss_gb"] == 2.0 and s["wall_time_s"] is None


def test_number_formats():
    assert format_number(1234567) == "1,234,567"
    assert format_number(0.000123456) == "0.0001235"
    assert format_number(float("nan")) == "NaN" and format_number(None) == "–"
    assert format_duration(3725) == "1h 02m 05s" and format_duration(42.0) == "42.0 s"


# ---------------------------------------------------------------- downsampling


def naive_envelope(x: np.ndarray, y: np.ndarray, buckets: int):
    size = math.ceil(len(y) / buckets)
    out = []
    for start in range(0, len(y), size):
        chunk, xs = y[start : start + size], x[start : start + size]
        out.append((xs.mean(), chunk.min(), chunk.mean(), chunk.max()))
    return [np.array(c) for c in zip(*out, strict=True)]


def test_bucket_envelope_matches_a_naive_loop_and_keeps_a_spike():
    rng = np.random.default_rng(1)
    y = rng.standard_normal(10_007)
    y[5_003] = 50.0  # one-step spike
    x = np.arange(len(y), dtype=float) * 2
    got = bucket_envelope(x, y, buckets=100)
    for g, want in zip(got, naive_envelope(x, y, 100), strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-12)
    xc, lo, mean, hi = got
    assert len(xc) <= 100 and 50.0 in hi and np.all(np.diff(xc) > 0)
    assert np.all(lo <= mean) and np.all(mean <= hi)


def test_short_series_are_drawn_point_by_point():
    df = pd.DataFrame({"step": np.arange(10), "train/lr": np.arange(10.0) ** 2})
    (chart,) = build_charts(df, buckets=100, only=["lr"])
    assert "downsampled" not in chart.note and not chart.spec["downsampled"]
    assert chart.spec["x"]["step"].tolist() == list(range(10))
    long = pd.DataFrame({"step": np.arange(1000), "train/lr": np.arange(1000.0)})
    (chart,) = build_charts(long, buckets=100, only=["lr"])
    assert "downsampled to 200 points" in chart.note and chart.spec["downsampled"]
    assert 100 <= len(chart.spec["x"]["step"]) <= 202


def test_chart_size_does_not_grow_with_rows():
    """Once a series has more points than the budget, a chart's data stays put (5x rows)."""
    keys = ("loss", "grad-norm", "layer-grad-norms")

    def sizes(n):
        return {
            c.key: len(dumps_spec(c.spec)) for c in build_charts(history(n), buckets=100, only=keys)
        }

    small, big = sizes(8_000), sizes(40_000)
    assert small.keys() == big.keys()
    for key, size in big.items():
        assert size < 1.25 * small[key] + 5_000, (key, size, small[key])
        assert size < 60_000, (key, size)


# ---------------------------------------------------------------- charts


def finding(fid="train.loss-spikes", severity=Severity.ERROR, step=150, **kw) -> Finding:
    return Finding(id=fid, severity=severity, title=kw.pop("title", "Loss spiked"), step=step, **kw)


def test_findings_are_marked_on_their_chart():
    df = history(300)
    keys = ("loss", "memory")
    plain = {c.key: c.spec for c in build_charts(df, only=keys)}
    f = finding(evidence={"steps": [150, 220]})
    marked = {c.key: c.spec for c in build_charts(df, findings=[f], only=keys)}
    assert plain["loss"]["marks"] == []
    assert [(m["step"], m["color"]) for m in marked["loss"]["marks"]] == [
        (150, "#c62828"),
        (220, "#c62828"),
    ]
    assert marked["memory"]["marks"] == []


def test_chart_keys_for_finding_follow_the_id_and_what_was_drawn():
    assert chart_keys_for_finding(finding("perf.data-stall"), ["loss", "step-time"]) == [
        "step-time"
    ]
    assert chart_keys_for_finding(finding("mem.leak"), ["loss", "memory"]) == ["memory"]
    assert chart_keys_for_finding(finding("train.whatever-new"), ["lr", "loss"]) == ["loss"]
    assert chart_keys_for_finding(finding("mem.leak"), ["loss"]) == []
    assert chart_keys_for_finding(finding("train.clipping-frequent"), ["loss", "grad-norm"]) == [
        "grad-norm"
    ]


def test_clip_threshold_drawn_when_configured():
    assert clip_threshold({"config": {"grad_clip": 0.5}}) == 0.5
    assert clip_threshold({"config": {"max_grad_norm": 2}}) == 2.0
    assert clip_threshold({"config": {"grad_clip": 0.0}}) is None
    assert clip_threshold({}) is None
    meta = {"config": {"grad_clip": 0.5}}
    with_clip = {c.key: c for c in build_charts(history(200), meta, only=["grad-norm"])}
    without = {c.key: c for c in build_charts(history(200), {}, only=["grad-norm"])}
    assert with_clip["grad-norm"].spec["hlines"] == [{"y": 0.5, "label": "clip threshold 0.5"}]
    assert "clip threshold from the run config: 0.5" in with_clip["grad-norm"].note
    assert without["grad-norm"].spec["hlines"] == [] and "clip" not in without["grad-norm"].note


def test_many_layers_become_a_heatmap_and_few_stay_lines():
    only = ["layer-grad-norms"]
    few = {c.key: c for c in build_charts(history(200, layers=("a", "b")), only=only)}
    layers = tuple(f"blocks.{i}" for i in range(12))
    many = {c.key: c for c in build_charts(history(200, layers=layers), only=only)}
    assert few["layer-grad-norms"].kind == "lines"
    assert [s["label"] for s in few["layer-grad-norms"].spec["series"]] == ["a", "b"]
    assert many["layer-grad-norms"].kind == "heatmap"
    assert many["layer-grad-norms"].spec["rows"] == list(layers)


def test_dollar_signs_in_names_are_drawn_literally():
    df = history(100, layers=("price$a$b", "x"))
    (chart,) = build_charts(df, only=["layer-grad-norms"])
    assert [s["label"] for s in chart.spec["series"]] == ["price$a$b", "x"]


def test_missing_metrics_mean_missing_charts():
    df = pd.DataFrame({"step": np.arange(50), "sys/rss_gb": np.linspace(1, 2, 50)})
    assert [c.key for c in build_charts(df)] == ["memory"]


# ---------------------------------------------------------------- HTML


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        self.ids.extend(v for k, v in attrs if k == "id" and v)


EVIL = "<script>alert(1)</script>"


def make_report(df=None, findings=(), meta=None, problems=()):
    df = history(300) if df is None else df
    return assemble_report(
        meta=meta or {}, summary=summarize(df), findings=list(findings), analyses={}, skipped=[],
        history_problems=list(problems),
    )  # fmt: skip


def render(df=None, findings=(), meta=None, problems=(), only=None):
    df = history(300) if df is None else df
    report = make_report(df, findings, meta, problems)
    charts = build_charts(df, meta or {}, list(findings), only=only)
    return render_html(report, list(findings), charts, source="runs/x"), report


def test_html_escapes_everything_that_comes_from_the_run():
    df = history(200, layers=(f"blocks.0.{EVIL}",))
    f = finding(
        title=f"title {EVIL}", message=f"msg {EVIL}", where=f"mod.{EVIL}",
        evidence={EVIL: EVIL, "steps": [150]}, recommendation=f"do {EVIL}",
    )  # fmt: skip
    meta = {"name": EVIL, "config": {EVIL: EVIL}}
    html, _ = render(df, [f], meta=meta, problems=[EVIL], only=["loss", "layer-grad-norms"])
    assert_only_own_scripts(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("&lt;script&gt;") >= 8
    # In the charts' JSON the layer name is escaped too, and reads back as itself.
    data = html[html.index('id="tdiag-charts">') + 18 : html.index("</script>")]
    assert "\\u003cscript\\u003ealert(1)" in data
    spec = json.loads(data)["layer-grad-norms"]
    assert [s["label"] for s in spec["series"]] == [f"blocks.0.{EVIL}"]
    # The folder name, skipped reasons, live alerts and a chart's metric names too.
    report = make_report(df, [f], meta, [EVIL])
    report["skipped"] = [{"id": EVIL, "reason": EVIL}]
    alert = Finding(id="monitor.x", severity=Severity.ERROR, title=EVIL, message=EVIL, step=3)
    charts = build_charts(df, meta, [f], only=["layer-grad-norms"])
    html = render_html(report, [f], charts, source=f"runs/{EVIL}", live_alerts=[alert])
    assert_only_own_scripts(html)
    assert f"runs/{EVIL}".replace("<", "&lt;").replace(">", "&gt;") in html
    assert html.count("&lt;script&gt;") >= 12


def assert_only_own_scripts(html: str) -> None:
    """The page's only script elements are the charts' JSON block and the two inline
    scripts the CSP names by hash (no run text can open or close one)."""
    lower = html.lower()
    assert lower.count("<script") == 3 and lower.count("</script") == 3, lower.count("<script")
    assert lower.count('<script type="application/json" id="tdiag-charts">') == 1
    assert "alert(1)</script>" not in lower


def test_csp_allows_exactly_the_inline_scripts_and_style_by_hash():
    html, _ = render(only=["loss"])
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    csp = html_lib.unescape(csp)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert "unsafe" not in csp and "http" not in csp  # no unsafe-inline/eval, no origin
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    assert len(scripts) == 2 and len(styles) == 1

    def sha(text):
        digest = hashlib.sha256(text.encode()).digest()
        return "'sha256-" + base64.b64encode(digest).decode() + "'"

    assert directives["script-src"].split() == [sha(s) for s in scripts]
    assert directives["style-src"].split() == [sha(s) for s in styles]
    assert not re.search(r"\sstyle=|\son[a-z]+=", html), "inline style/handler attribute"


def test_html_is_self_contained_with_unique_ids():
    html, _ = render(findings=[finding(), finding("perf.low-mfu", Severity.WARNING, step=None)])
    parsed = _Collector()
    parsed.feed(html)
    assert "link" not in parsed.tags and "iframe" not in parsed.tags and "img" not in parsed.tags
    assert not any(k == "src" for k, _ in parsed.attrs), "no script/img loaded from anywhere"
    # uPlot's licence banner names its home page; no other URL may appear (the browser
    # test checks that no request is made).
    text = html.replace("/*! https://github.com/leeoniya/uPlot (v1.6.32) */", "", 1)
    assert not re.search(r"https?://|@import|url\((?!#)", text), "external reference"
    for name, value in parsed.attrs:
        if name in ("src", "href", "xlink:href"):
            assert value is not None and value.startswith(("#", "data:")), (name, value)
    dupes = {i for i in parsed.ids if parsed.ids.count(i) > 1}
    assert not dupes, sorted(dupes)[:5]
    assert len(html) < 2_000_000


def test_html_findings_come_first_and_link_to_their_charts():
    f1 = finding("train.nonfinite-loss", Severity.ERROR, step=120, title="Loss became NaN")
    f2 = finding("perf.low-mfu", Severity.WARNING, step=None, title="Low MFU")
    html, _ = render(findings=[f1, f2], only=["loss", "throughput"])
    assert html.index('id="findings"') < html.index('id="charts"')
    assert html.index('id="finding-1"') < html.index('id="finding-2"')
    block1 = html[html.index('id="finding-1"') : html.index('id="finding-2"')]
    assert 'href="#chart-loss"' in block1
    block2 = html[html.index('id="finding-2"') : html.index('id="charts"')]
    assert 'href="#chart-throughput"' in block2
    loss_fig = html[html.index('id="chart-loss"') :]
    assert 'href="#finding-1"' in loss_fig[: loss_fig.index("</figure>")]
    assert 'data-tdiag-chart="loss"' in loss_fig[: loss_fig.index("</figure>")]


def test_html_states_history_problems_and_empty_findings():
    html, _ = render(problems=["the last line was cut off (torn write) and was skipped"], only=[])
    assert "1 problem reading the history" in html and "cut off" in html
    assert "No finding" in html


# ---------------------------------------------------------------- JSON and console


def test_report_json_is_strict_and_round_trips_findings():
    f = finding(evidence={"ratio": math.inf, "median": math.nan, "steps": [1, 2]})
    text = dumps_report(make_report(findings=[f]))
    loaded = json.loads(text, parse_constant=lambda t: pytest.fail(f"bare {t}"))
    assert Finding.from_dict(loaded["findings"][0]) == f
    assert loaded["summary"]["errors"] == 1 and loaded["summary"]["steps"] == 300


def test_console_summary_shows_numbers_and_findings_literally():
    f = finding(title="weird [bold]title[/bold]", step=7)
    report = make_report(findings=[f])
    buf = io.StringIO()
    render_console(Console(file=buf, width=120, color_system=None), report, [f])
    out = buf.getvalue()
    assert "Final train loss" in out and "300" in out
    assert "train.loss-spikes" in out and "weird [bold]title[/bold]" in out
    assert "1 error(s), 0 warning(s), 0 info" in out


def test_console_names_the_first_thing_to_do_and_the_live_alerts():
    f = finding(recommendation="Lower the LR " + "x " * 300, step=7)
    info = finding("perf.low-mfu", Severity.INFO, recommendation="Use bf16")
    report = make_report(findings=[f, info])
    report["live_alerts"] = [{"id": "train.nonfinite-loss"}]
    buf = io.StringIO()
    render_console(Console(file=buf, width=100, color_system=None), report, [f, info])
    out = " ".join(buf.getvalue().split())
    assert "What to do first (#1): Lower the LR" in out and "Use bf16" not in out
    assert len(out) < 2000  # the long recommendation is cut: the HTML has it all
    assert "1 live alert(s) raised while training" in out
    buf = io.StringIO()  # only an info: no "what to do first"
    render_console(
        Console(file=buf, width=100, color_system=None), make_report(findings=[info]), [info]
    )
    assert "What to do first" not in buf.getvalue()


def test_summary_treats_a_row_of_only_one_metric_as_logged():
    df = pd.DataFrame(
        {
            "step": [1, 2, 3],
            "train/loss": [3.0, 2.0, 1.0],
            "train/lr": [1e-3, 1e-3, 1e-3],
            "sys/rss_gb": [1.0, 1.0, 1.0],
            "val/loss": [np.nan, 2.5, np.nan],
        }
    )
    assert summarize(df)["final_val_loss"] == 2.5  # the NaN on step 3 is only absence
    own_row = pd.DataFrame({"step": [4], "val/loss": [np.nan]})
    df2 = pd.concat([df, own_row], ignore_index=True)
    assert math.isnan(summarize(df2)["final_val_loss"])  # a row of its own: a logged NaN
    assert summarize(df2)["best_val_loss"] == 2.5 and summarize(df2)["final_train_loss"] == 1.0

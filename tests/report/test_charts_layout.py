"""Chart specs: what a reader will see. Finding marks numbered once, spans as bands, axes
that do not exaggerate, one-row runs visible, the same step axis on every panel, titles and
threshold lines naming only what is drawn, heatmap rows in model order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report.charts import build_charts, finding_span, marks_by_chart
from tdiag.report.charts.build import model_order


def history(n: int = 300) -> pd.DataFrame:
    steps = np.arange(1, n + 1)
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "step": steps,
            "time": 1000.0 + 0.5 * steps,
            "train/tokens": 4096.0 * steps,
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


def finding(fid: str, step: int | None, sev=Severity.WARNING, **evidence) -> Finding:
    return Finding(id=fid, severity=sev, title=fid, step=step, evidence=evidence)


def spec(df, key, meta=None, findings=()):
    (chart,) = build_charts(df, meta or {}, list(findings), only=[key])
    return chart.spec


def test_a_finding_with_many_steps_is_numbered_once():
    f = finding("train.loss-spikes", 100, steps=[100, 120, 140, 160, 180, 200, 220])
    marks = spec(history(), "loss", findings=[f])["marks"]
    assert [m["step"] for m in marks] == [100, 120, 140, 160, 180, 200, 220]
    assert [m["primary"] for m in marks] == [True] + [False] * 6
    assert {m["label"] for m in marks} == {"1"}
    assert spec(history(), "loss")["marks"] == []


def test_marks_are_numbered_like_the_findings_and_only_on_their_charts():
    fs = [finding("mem.leak", 40, Severity.ERROR), finding("train.plateau", 290)]
    loss, memory = (spec(history(), k, findings=fs) for k in ("loss", "memory"))
    assert [(m["label"], m["step"]) for m in loss["marks"]] == [("2", 290)]
    assert [(m["label"], m["color"]) for m in memory["marks"]] == [("1", "#c62828")]


def test_a_span_finding_is_a_shaded_band_with_one_number():
    f = finding("perf.data-stall", 30, step_range=[30, 300])
    assert finding_span(f) == (30, 300)
    assert finding_span(finding("perf.data-stall", 30, step_range=[1, "x"])) is None
    (mark,) = marks_by_chart([f], ["step-time"])["step-time"]
    assert (mark.step, mark.end, mark.label) == (30, 300, "1")
    html_f = finding("perf.data-stall", 30, step_range=[30, 300], impact=0.5)
    from tdiag.report.render_html import _finding_views

    (view,) = _finding_views([html_f], [])
    assert view["evidence"][0] == ("steps judged", "30 – 300")
    assert view["impact"] == "0.50" and all(k != "impact" for k, _ in view["evidence"])


def test_quantities_from_zero_start_at_zero_and_losses_do_not():
    df = history()
    assert spec(df, "memory")["panels"][0]["zero"] is True  # a flat 0.352 GB stays flat
    assert spec(df, "loss")["panels"][0]["zero"] is False


def test_throughput_and_mfu_on_separate_panels_sharing_steps():
    s = spec(history(), "throughput")
    assert [p["label"] for p in s["panels"]] == ["tokens / s", "MFU"]
    assert [(x["label"], x["panel"]) for x in s["series"]] == [("tokens/s", 0), ("MFU", 1)]
    assert all(len(x["values"]) == len(s["x"]["step"]) for x in s["series"])  # one shared x
    assert s["panels"][1]["zero"] is True


def test_the_x_axis_can_be_tokens_or_wall_clock():
    s = spec(history(), "loss")
    assert set(s["x"]) == {"step", "tokens", "time"}
    np.testing.assert_allclose(s["x"]["tokens"], 4096.0 * np.asarray(s["x"]["step"]))
    np.testing.assert_allclose(s["x"]["time"], 0.5 * (np.asarray(s["x"]["step"]) - 1))
    no_time = history().drop(columns=["time", "train/tokens"])
    assert set(spec(no_time, "loss")["x"]) == {"step"}


def test_validation_is_drawn_with_points_and_nonfinite_loss_is_marked():
    df = history()
    df["val/loss"] = np.where(df["step"] % 50 == 0, 1.5, np.nan)
    df.loc[df["step"] == 120, "train/loss"] = np.inf
    s = spec(df, "loss")
    train, val = s["series"]
    assert train["smooth"] and not val["smooth"] and val["points"] and val["total"] == 6
    assert [(n["label"], list(n["steps"])) for n in s["nonfinite"]] == [("non-finite loss", [120])]
    assert s["smoothing"] is not None and 0.6 <= s["smoothing"] < 1


def test_a_metric_missing_on_some_rows_is_not_marked_non_finite():
    df = history()
    val = pd.DataFrame({"step": [50, 100], "val/loss": [2.0, 1.9]})  # rows of their own
    df = pd.concat([df, val]).sort_values("step", kind="stable").reset_index(drop=True)
    assert spec(df, "grad-norm")["nonfinite"] == []
    assert spec(df, "loss")["nonfinite"] == []


def test_a_one_row_history_is_drawn_with_markers():
    df = pd.DataFrame({"step": [1], "train/loss": [3.0], "train/lr": [1e-3]})
    charts = {c.key: c for c in build_charts(df)}
    assert set(charts) == {"loss", "lr"}
    for chart in charts.values():
        assert all(s["points"] for s in chart.spec["series"]), chart.key


def test_titles_and_threshold_lines_name_only_what_is_drawn():
    df = history()
    cpu = df[["step"]].assign(**{"sys/cpu_percent": 50.0})
    (util,) = build_charts(cpu, only=["utilization"])
    assert util.title == "CPU utilisation"
    meta = {"environment": {"gpu_mem_total_gb": 80.0}}
    assert spec(df, "memory", meta)["hlines"] == [{"y": 80.0, "label": "GPU capacity 80 GB"}]
    assert spec(df, "memory", {})["hlines"] == []
    clip = spec(df, "grad-norm", {"config": {"grad_clip": 0.5}})
    assert clip["hlines"] == [{"y": 0.5, "label": "clip threshold 0.5"}]
    assert spec(df, "grad-norm", {})["hlines"] == []


def test_layer_heatmap_rows_in_model_order_without_empty_columns():
    n = 200
    steps = np.arange(1, n + 1) * 5
    df = pd.DataFrame({"step": steps})
    order = [f"blocks.{i}" for i in (0, 1, 2, 10, 11, 3, 4, 5, 6, 7, 8, 9)]  # as logged
    for i, name in enumerate(order):
        df[f"grad_norm/{name}"] = 0.1 * (i + 1) * np.ones(n)
    df.loc[77, "grad_norm/blocks.3"] = 50.0  # a one-row spike
    val = pd.DataFrame({"step": steps[::10], "val/loss": 2.0})  # eval rows in between
    df = pd.concat([df, val]).sort_values("step", kind="stable").reset_index(drop=True)
    (chart,) = build_charts(df, only=["layer-grad-norms"], buckets=200)
    s = chart.spec
    assert s["kind"] == "heatmap" and s["rows"] == order
    z = np.asarray(s["z"], dtype=float).reshape(len(order), s["ncols"])
    assert s["ncols"] == 50 and not np.isnan(z).all(axis=0).any()
    assert z.max() == 50.0  # the bucket's max keeps the spike
    assert s["x0"][0] == 5 and s["x1"][-1] == 5 * n


def test_gradient_rows_follow_the_model_order_of_the_activations():
    forward = ["embed", "blocks.0.norm1", "blocks.0.attn", "blocks.0.mlp", "norm_f", "lm_head"]
    grouped = ["blocks.0.attn.qkv", "blocks.0.mlp.fc", "embed", "blocks.0.norm1", "norm_f", "x"]
    want = ["embed", "blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.mlp.fc", "norm_f", "x"]
    assert model_order(grouped, forward) == want
    assert model_order(grouped, []) == grouped
    n = 20
    df = pd.DataFrame({"step": np.arange(n)})
    for name in grouped:
        df[f"grad_norm/{name}"] = 1.0
    for name in forward:
        df[f"act_rms/{name}"] = 1.0
    charts = {c.key: c for c in build_charts(df, only=["layer-grad-norms", "layer-act-rms"])}
    assert [s["label"] for s in charts["layer-grad-norms"].spec["series"]] == want
    assert charts["layer-act-rms"].spec["series"][0]["label"] == "embed"


def test_every_chart_starts_on_the_runs_steps():
    df = history()
    df["val/loss"] = np.where(df["step"] % 50 == 0, 1.5, np.nan)
    df.loc[df["step"] > 100, "train/grad_norm"] = np.nan  # a metric that stopped early
    df.loc[df["step"] < 50, "sys/rss_gb"] = np.nan  # and one that started late
    charts = build_charts(df)
    assert {c.key for c in charts} >= {"loss", "grad-norm", "memory"}
    for c in charts:
        assert c.spec["xrange"] == [1.0, 300.0], c.key
    assert build_charts(df.iloc[:1], only=["loss"])[0].spec["xrange"] is None  # one step


def test_cpu_mfu_is_labelled_vs_the_measured_matmul_peak_not_mfu():
    """On a CPU (no datasheet peak, meta.json perf.peak_source "measured: …") the ratio is
    not an MFU: the chart says so, like the headline card; with a datasheet peak it is MFU."""
    import numpy as np
    import pandas as pd

    from tdiag.report.charts import build_charts

    steps = np.arange(1, 51)
    df = pd.DataFrame(
        {"step": steps, "perf/tokens_per_sec": 1e4 + steps, "perf/mfu": 0.3 + 0 * steps}
    )
    cpu = {"perf": {"peak_source": "measured: fp32 1024x1024 matmul, best of 7, 1 thread(s)"}}
    gpu = {"perf": {"peak_source": "datasheet: NVIDIA H100 bf16"}}
    (c_cpu,) = build_charts(df, cpu, only=["throughput"])
    (c_gpu,) = build_charts(df, gpu, only=["throughput"])
    labels = lambda c: [s["label"] for s in c.spec["series"]]  # noqa: E731
    assert "MFU" not in c_cpu.title and "vs measured matmul peak" in labels(c_cpu)
    assert c_gpu.title == "Throughput and MFU" and "MFU" in labels(c_gpu)

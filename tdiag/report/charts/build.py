"""Every chart of one run's report, from its history: loss, the Contract-3 line charts and
the per-layer families (lines for a few layers, a heatmap for many)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tdiag.findings import Finding
from tdiag.report.charts.data import history_axes
from tdiag.report.charts.heatmaps import heatmap_chart
from tdiag.report.charts.lines import line_chart
from tdiag.report.charts.marks import clip_threshold, marks_by_chart
from tdiag.report.charts.model import Chart, Mark, Series
from tdiag.report.rules.memory import gpu_capacity
from tdiag.report.summary import logged_mask, numeric_column

__all__ = ["build_charts"]

_MAX_LAYER_LINES = 8
# Legend labels of the Contract-3 metrics (the chart header lists the raw names).
LABELS = {
    "train/grad_norm": "grad norm",
    "train/grad_clip_frac": "fraction of steps clipped",
    "perf/tokens_per_sec": "tokens/s",
    "perf/mfu": "MFU",
    "perf/step_time": "step time",
    "perf/data_time": "data loading",
    "dist/step_time_max": "slowest rank",
    "dist/step_time_min": "fastest rank",
    "sys/gpu_mem_allocated_gb": "GPU allocated",
    "sys/gpu_mem_reserved_gb": "GPU reserved",
    "sys/gpu_mem_peak_gb": "GPU peak",
    "sys/rss_gb": "process RSS",
    "sys/gpu_util": "GPU",
    "sys/cpu_percent": "CPU (process)",
}
LAYER_CHARTS = (
    ("layer-grad-norms", "grad_norm/"),
    ("layer-act-rms", "act_rms/"),
    ("attn-entropy", "attn/entropy/"),
    ("attn-max-logit", "attn/max_logit/"),
)
LAYER_TITLES = {
    "layer-grad-norms": "Per-layer gradient norms",
    "layer-act-rms": "Per-layer activation RMS",
    "attn-entropy": "Attention entropy per layer (nats)",
    "attn-max-logit": "Attention max logit per layer",
}
# key -> (main panel metrics, lower panel metrics)
SIMPLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lr": (("train/lr",), ()),
    "grad-norm": (("train/grad_norm",), ("train/grad_clip_frac",)),
    "update-ratio": (("train/update_ratio",), ()),
    "throughput": (("perf/tokens_per_sec",), ("perf/mfu",)),
    "step-time": (
        ("perf/step_time", "perf/data_time", "dist/step_time_max", "dist/step_time_min"),
        (),
    ),
    "memory": (
        (
            "sys/gpu_mem_allocated_gb",
            "sys/gpu_mem_reserved_gb",
            "sys/gpu_mem_peak_gb",
            "sys/rss_gb",
        ),
        (),
    ),
    "utilization": (("sys/gpu_util", "sys/cpu_percent"), ()),
}
# key -> (title, main y label with unit, lower panel label)
SIMPLE_TITLES = {
    "lr": ("Learning rate", "lr", ""),
    "grad-norm": ("Gradient norm (before clipping)", "global grad norm", "clipped"),
    "update-ratio": ("Update / weight ratio", "|Δw| / |w|", ""),
    "throughput": ("Throughput and MFU", "tokens / s", "MFU"),
    "step-time": ("Step and data-loading time", "seconds", ""),
    "memory": ("Memory", "GB", ""),
    "utilization": ("GPU and CPU utilisation", "%", ""),
}
# Quantities >= 0 that read wrong on an axis not starting at 0 (a flat 0.352 GB drawn from
# 0.351 looks like a leak).
FROM_ZERO = ("lr", "throughput", "step-time", "memory", "utilization")


def _column(df: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of the rows that logged ``name`` (a NaN left is a logged NaN/Inf);
    None when the metric has no finite value."""
    col = numeric_column(df, name)
    if col is None:
        return None
    logged = logged_mask(df, name)
    y = col.to_numpy(dtype=np.float64)[logged]
    if not np.isfinite(y).any():
        return None
    return df["step"].to_numpy(dtype=np.float64)[logged], y


def _planned(df: pd.DataFrame) -> list[str]:
    """Chart keys the history has data for (so findings can be linked before drawing)."""
    cols = set(df.columns)
    keys = []
    if cols & {"train/loss", "val/loss"}:
        keys.append("loss")
    for key, (main, lower) in SIMPLE.items():
        if cols & {*main, *lower}:
            keys.append(key)
    for key, prefix in LAYER_CHARTS:
        if any(c.startswith(prefix) for c in cols):
            keys.append(key)
    return keys


def model_order(names: Sequence[str], reference: Sequence[str]) -> list[str]:
    """``names`` (module paths) sorted in the order of ``reference`` (module paths in the
    order the model runs them, e.g. the ``act_rms/`` columns, which forward hooks write in
    call order); a name not in it takes the place of its first parent or child there, and
    names with no relative there keep their order, after the others."""
    where = {r: i for i, r in enumerate(reference)}

    def key(item: tuple[int, str]) -> tuple[int, int]:
        pos, name = item
        if name in where:
            return where[name], pos
        for i, r in enumerate(reference):
            if r.startswith(name + ".") or name.startswith(r + "."):
                return i, pos
        return len(reference), pos

    return [n for _, n in sorted(enumerate(names), key=key)]


def _title(key: str, names: Sequence[str]) -> str:
    """The chart title, naming only what is drawn (no "GPU" on a CPU-only run)."""
    if key == "utilization":
        gpu, cpu = "sys/gpu_util" in names, "sys/cpu_percent" in names
        if gpu and cpu:
            return "GPU and CPU utilisation"
        return ("GPU" if gpu else "CPU") + " utilisation"
    if key == "throughput" and "perf/mfu" not in names:
        return "Throughput"
    return SIMPLE_TITLES[key][0]


def _wide_range(values: Sequence[np.ndarray]) -> bool:
    """True when the positive values span more than two decades (a log axis reads better)."""
    finite = [v[np.isfinite(v)] for v in values]
    if not finite or any((v <= 0).any() for v in finite):
        return False
    pos = [v for v in finite if len(v)]
    if not pos:
        return False
    return max(float(v.max()) for v in pos) / min(float(v.min()) for v in pos) > 100.0


@dataclass(frozen=True)
class _Context:
    """What every chart of one report shares."""

    df: pd.DataFrame
    meta: Mapping[str, Any] | None
    marks: Mapping[str, list[Mark]]
    note: str
    buckets: int
    common: Mapping[str, Any]  # line_chart's axes and max_points


def _loss_chart(ctx: _Context) -> Chart | None:
    series = []
    train, val = _column(ctx.df, "train/loss"), _column(ctx.df, "val/loss")
    if train is not None:
        series.append(Series("train", *train, smooth=True, nonfinite_label="non-finite loss"))
    if val is not None:
        shown = int(np.isfinite(val[1]).sum())
        series.append(Series("validation", *val, points=shown <= 100))
    if not series:
        return None
    return line_chart(
        "loss", "Loss", series, ylabel="loss", marks=ctx.marks.get("loss", []),
        note=ctx.note + "; smoothed = debiased exponential moving average (slider)",
        metrics=[m for m in ("train/loss", "val/loss") if m in ctx.df.columns], **ctx.common,
    )  # fmt: skip


def _thresholds(ctx: _Context, key: str, main: Sequence[str]) -> tuple[list, str]:
    """The threshold lines of a chart (clip threshold, GPU capacity) and its caption part."""
    if key == "grad-norm":
        clip = clip_threshold(ctx.meta)
        if clip:
            return [
                (clip, f"clip threshold {clip:g}")
            ], f"; clip threshold from the run config: {clip:g}"
    if key == "memory" and any(n.startswith("sys/gpu_mem") for n in main):
        cap = gpu_capacity(ctx.df, ctx.meta)
        if cap:
            return [
                (cap[0], f"GPU capacity {cap[0]:g} GB")
            ], "; dotted line: the GPU's memory capacity"
    return [], ""


def measured_peak(meta: Mapping[str, Any] | None) -> bool:
    """True when perf/mfu's peak was measured on the machine (no datasheet peak: a CPU),
    so the ratio is not an MFU (meta.json ``perf.peak_source``)."""
    source = ((meta or {}).get("perf") or {}).get("peak_source")
    return isinstance(source, str) and source.startswith("measured")


def _simple_chart(ctx: _Context, key: str) -> Chart | None:
    main_names, lower_names = SIMPLE[key]
    main = [(n, y) for n in main_names if (y := _column(ctx.df, n)) is not None]
    lower = [(n, y) for n in lower_names if (y := _column(ctx.df, n)) is not None]
    if not main and not lower:
        return None
    _, ylabel, lower_label = SIMPLE_TITLES[key]
    measured = key == "throughput" and measured_peak(ctx.meta)
    if measured:  # no datasheet peak (a CPU): the ratio is to the machine's own best matmul
        lower_label = "vs matmul peak"
    if not main:  # only the lower panel's metric: draw it as the main one
        main, lower, ylabel = lower, [], lower_label
    names = [n for n, _ in (*main, *lower)]
    hlines, extra = _thresholds(ctx, key, [n for n, _ in main])
    bad = {"train/grad_norm": "non-finite grad norm"}
    series = [Series(LABELS.get(n, n), *y, nonfinite_label=bad.get(n)) for n, y in main]
    lower_series = {"perf/mfu": "vs measured matmul peak"} if measured else {}
    series += [Series(lower_series.get(n, LABELS.get(n, n)), *y, panel=1) for n, y in lower]
    wide = key in ("grad-norm", "update-ratio") and _wide_range([y for _, (_, y) in main])
    title = (
        "Throughput (and vs matmul peak)"
        if measured and "perf/mfu" in names
        else _title(key, names)
    )
    return line_chart(
        key, title, series, ylabel=ylabel, lower_label=lower_label, logy=wide,
        from_zero=key in FROM_ZERO, hlines=hlines, marks=ctx.marks.get(key, []),
        note=ctx.note + extra, metrics=names, **ctx.common,
    )  # fmt: skip


def _layer_chart(ctx: _Context, key: str, prefix: str) -> Chart | None:
    """One line per layer up to a few layers, a heatmap beyond (rows in model order)."""
    df = ctx.df
    cols = [c for c in df.columns if c.startswith(prefix)]
    reference = [c[len("act_rms/") :] for c in df.columns if c.startswith("act_rms/")]
    if prefix == "grad_norm/" and reference:  # gradients come grouped by kind: re-order
        cols = [prefix + m for m in model_order([c[len(prefix) :] for c in cols], reference)]
    present = [(c, y) for c in cols if (y := _column(df, c)) is not None]
    if not present:
        return None
    marks = ctx.marks.get(key, [])
    if len(present) <= _MAX_LAYER_LINES:
        series = [Series(c[len(prefix) :], *y) for c, y in present]
        return line_chart(
            key, LAYER_TITLES[key], series, ylabel=prefix.rstrip("/"),
            logy=_wide_range([y for _, (_, y) in present]), marks=marks, note=ctx.note,
            metrics=cols, **ctx.common,
        )  # fmt: skip
    chart = heatmap_chart(
        key, LAYER_TITLES[key], df, [c for c, _ in present], prefix, marks=marks,
        columns=max(1, ctx.buckets // 4), value_label=prefix.rstrip("/"),
        note=ctx.note + f"; {len(present)} layers in model order, colour = max per bucket",
    )  # fmt: skip
    return Chart(chart.key, chart.title, tuple(cols), chart.spec, chart.note)


def build_charts(
    df: pd.DataFrame,
    meta: Mapping[str, Any] | None = None,
    findings: Sequence[Finding] = (),
    *,
    buckets: int = 1000,
    only: Iterable[str] | None = None,
) -> list[Chart]:
    """Every chart the history has data for.

    Args:
        df: the history (``step`` column plus metric columns).
        meta: meta.json (the clip threshold and GPU capacity are read from it).
        findings: numbered 1.. in this order; their steps are marked on their charts.
        buckets: downsampling buckets per series, each keeping its min and max point
            (so at most ``2 * buckets`` points per series; heatmaps get ``buckets // 4``
            columns).
        only: build only the charts with these keys (all by default).

    Returns:
        The charts, in reading order; none for metrics the history lacks.
    """
    available = _planned(df)
    marks = marks_by_chart(findings, available)
    if only is not None:
        wanted = set(only)
        available = [k for k in available if k in wanted]
    max_points = 2 * buckets
    note = f"{len(df):,} rows" + (
        f", downsampled to {max_points:,} points per series (each bucket's min and max kept)"
        if len(df) > max_points
        else ""
    )
    steps = df["step"].to_numpy(dtype=np.float64)
    steps = steps[np.isfinite(steps)]
    span = (float(steps.min()), float(steps.max())) if len(steps) else None
    # Every chart starts on the run's first to last step, so the charts line up.
    common = {
        "axes": history_axes(df),
        "max_points": max_points,
        "x_range": span if span and span[1] > span[0] else None,
    }
    ctx = _Context(df, meta, marks, note, buckets, common)
    charts = [_loss_chart(ctx)] if "loss" in available else []
    charts += [_simple_chart(ctx, key) for key in SIMPLE if key in available]
    charts += [_layer_chart(ctx, k, prefix) for k, prefix in LAYER_CHARTS if k in available]
    return [c for c in charts if c is not None]

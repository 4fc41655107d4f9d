"""Charts of a run's history, drawn with matplotlib (Agg, no pyplot state) as inline SVG.

Long series are downsampled before drawing: the rows are cut into at most ``buckets``
equal buckets and each keeps its minimum and its maximum, in the order they occurred,
so a one-step spike in a million-step run still shows and the page stays small.
Steps that findings point at are drawn as vertical lines numbered like the findings.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report.summary import logged_mask, numeric_column

__all__ = [
    "Chart",
    "build_charts",
    "chart_keys_for_finding",
    "clip_threshold",
    "downsample_minmax",
    "finding_steps",
]

logger = logging.getLogger(__name__)

SEVERITY_COLORS = {Severity.ERROR: "#c62828", Severity.WARNING: "#e65100", Severity.INFO: "#1565c0"}
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
_MAX_MARKS_PER_FINDING = 25
_MAX_LAYER_LINES = 8

# Which chart a finding's id points at (first one drawn wins); unknown ids use the prefix.
FINDING_CHARTS: dict[str, tuple[str, ...]] = {
    "train.nonfinite-loss": ("loss",),
    "train.divergence": ("loss", "grad-norm"),
    "train.loss-spikes": ("loss",),
    "train.plateau": ("loss", "lr"),
    "train.lr-too-high": ("loss", "lr"),
    "train.lr-too-low": ("loss", "lr"),
    "train.grad-norm-growth": ("grad-norm",),
    "train.clipping-frequent": ("grad-norm",),
    "train.overfitting": ("loss",),
    "train.early-stop": ("loss",),
    "perf.gpu-underutilized": ("utilization", "throughput"),
    "perf.data-stall": ("step-time", "throughput"),
    "perf.throughput-degradation": ("throughput", "step-time"),
    "perf.low-mfu": ("throughput",),
    "mem.near-capacity": ("memory",),
    "mem.leak": ("memory",),
    "dist.straggler": ("step-time",),
}
_PREFIX_CHARTS = {
    "train.": ("loss",),
    "perf.": ("throughput", "step-time"),
    "mem.": ("memory",),
    "dist.": ("step-time",),
    "grad.": ("grad-norm",),
    "attn.": ("attn-entropy", "attn-max-logit"),
}
# Config keys that hold a gradient-clipping threshold (meta.json "config").
_CLIP_KEYS = ("grad_clip", "clip_grad_norm", "max_grad_norm", "grad_clip_norm", "clip_norm", "clip")


@dataclass(frozen=True)
class Chart:
    """One chart of the report.

    Attributes:
        key: stable short name ("loss", "grad-norm", …); the HTML anchor is ``chart-<key>``.
        title: heading shown above the chart.
        svg: inline SVG markup (ids prefixed so several charts can share a page).
        metrics: the history columns drawn.
        svg_log: the same chart with a log y axis (loss only), or None.
        note: a short caption (downsampling, clip threshold source …).
    """

    key: str
    title: str
    svg: str
    metrics: tuple[str, ...]
    svg_log: str | None = None
    note: str = ""

    @property
    def anchor(self) -> str:
        return "chart-" + self.key

    @property
    def metrics_label(self) -> str:
        """The metrics drawn, short: per-layer families as ``grad_norm/* (38 series)``."""
        if len(self.metrics) <= 4:
            return ", ".join(self.metrics)
        prefix = self.metrics[0].rsplit("/", 1)[0]
        if all(m.startswith(prefix + "/") for m in self.metrics):
            return f"{prefix}/* ({len(self.metrics)} series)"
        return ", ".join(self.metrics[:4]) + f", … ({len(self.metrics)} series)"


@dataclass(frozen=True)
class _Mark:
    step: int
    label: str
    color: str


@dataclass
class _Series:
    name: str
    x: np.ndarray
    y: np.ndarray
    total: int = 0


# ---------------------------------------------------------------- data preparation


def downsample_minmax(
    x: np.ndarray, y: np.ndarray, buckets: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per bucket of consecutive points, the min and the max of ``y`` (in time order).

    At most ``2 * buckets`` points come out; series that are already short come back as is.
    NaNs are ignored (a bucket of only NaNs yields nothing). Cost: O(len(y)), vectorised.
    """
    n = len(y)
    if n <= 2 * buckets:
        return x, y
    size = math.ceil(n / buckets)
    nb = math.ceil(n / size)
    pad = nb * size - n
    yp = np.concatenate([y, np.full(pad, np.nan)]).reshape(nb, size)
    nan = np.isnan(yp)
    lo = np.where(nan, np.inf, yp).argmin(axis=1)
    hi = np.where(nan, -np.inf, yp).argmax(axis=1)
    base = np.arange(nb) * size
    idx = np.stack([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1) + base[:, None]
    idx = idx.ravel()
    keep = idx < n
    keep[1::2] &= idx[1::2] != idx[0::2]  # lo == hi: one point
    idx = idx[keep]
    idx = idx[~np.isnan(y[idx])]
    return x[idx], y[idx]


def _series(df: pd.DataFrame, name: str, steps: np.ndarray, buckets: int) -> _Series | None:
    col = numeric_column(df, name)
    if col is None:
        return None
    y = col.to_numpy()
    mask = np.isfinite(y)
    if not mask.any():
        return None
    xs, ys = downsample_minmax(steps[mask], y[mask], buckets)
    return _Series(name, xs, ys, total=int(mask.sum()))


def _smooth(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """EMA over ~1 % of the points (capped), then strided to ``buckets`` points."""
    span = int(min(1000, max(5, len(y) // 100)))
    smooth = pd.Series(y).ewm(span=span, adjust=True).mean().to_numpy()
    stride = max(1, len(y) // buckets)
    return x[::stride], smooth[::stride]


def _nonfinite_steps(df: pd.DataFrame, name: str, steps: np.ndarray) -> np.ndarray:
    """Steps where ``name`` was logged non-finite (see :func:`logged_mask`)."""
    col = numeric_column(df, name)
    if col is None:
        return np.empty(0, dtype=np.int64)
    return steps[logged_mask(df, name) & ~np.isfinite(col.to_numpy())]


def clip_threshold(meta: Mapping[str, Any] | None) -> float | None:
    """The gradient-clipping threshold from meta.json's config, if one is recorded."""
    if not meta:
        return None
    for scope in (meta.get("config"), meta.get("train_config"), meta):
        if not isinstance(scope, Mapping):
            continue
        for key in _CLIP_KEYS:
            value = scope.get(key)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if is_number and math.isfinite(value) and value > 0:
                return float(value)
    return None


def finding_steps(finding: Finding) -> list[int]:
    """The steps a finding points at: ``step`` and ``evidence["steps"]`` (first few)."""
    steps: list[int] = []
    if finding.step is not None:
        steps.append(int(finding.step))
    extra = finding.evidence.get("steps") if isinstance(finding.evidence, Mapping) else None
    if isinstance(extra, list | tuple):
        for s in extra:
            if isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s):
                steps.append(int(s))
    seen: set[int] = set()
    out = [s for s in steps if not (s in seen or seen.add(s))]
    return out[:_MAX_MARKS_PER_FINDING]


def chart_keys_for_finding(finding: Finding, available: Iterable[str]) -> list[str]:
    """Chart keys a finding belongs to, best first, restricted to the charts drawn."""
    available = list(available)
    wanted: list[str] = list(FINDING_CHARTS.get(finding.id, ()))
    if not wanted:  # an id this version does not know: go by its family
        for prefix, keys in _PREFIX_CHARTS.items():
            if finding.id.startswith(prefix):
                wanted.extend(keys)
    out: list[str] = []
    for key in wanted:
        if key in available and key not in out:
            out.append(key)
    return out


# ---------------------------------------------------------------- drawing


def _figure(height: float = 3.0) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, height), layout="constrained")
    return fig


_ID_RE = re.compile(r'\bid="([^"]+)"')


def _to_svg(fig: Any, salt: str) -> str:
    """Render ``fig`` to SVG markup fit to inline in HTML: no XML prolog/doctype/metadata,
    no fixed size (CSS scales it), ids prefixed with ``salt`` so charts do not collide."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)  # mathtext source comments
    svg = re.sub(r'\s(?:width|height)="[\d.]+pt"', "", svg[:400], count=2) + svg[400:]
    svg = re.sub(r'\sxmlns(?::xlink)?="[^"]*"', "", svg)
    ids = set(_ID_RE.findall(svg))
    if ids:
        svg = _ID_RE.sub(lambda m: f'id="{salt}-{m.group(1)}"', svg)
        svg = re.sub(
            r"(url\(#|href=\"#)([^\")]+)",
            lambda m: m.group(1) + (f"{salt}-{m.group(2)}" if m.group(2) in ids else m.group(2)),
            svg,
        )
    return svg.replace("<svg ", f'<svg role="img" class="chart-svg" data-chart="{salt}" ', 1)


def _literal(text: str) -> str:
    """Run text drawn as is: a ``$`` would otherwise start matplotlib mathtext (which log
    axes need for their 10^k tick labels, so mathtext stays on)."""
    return text.replace("$", r"\$")


def _style_axes(ax: Any, *, ylabel: str = "") -> None:
    ax.grid(True, color="#e0e0e0", linewidth=0.6)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _draw_marks(ax: Any, marks: Sequence[_Mark]) -> None:
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for mark in marks:
        ax.axvline(mark.step, color=mark.color, linewidth=1.0, linestyle="--", alpha=0.8, zorder=1)
        ax.text(
            mark.step, 1.0, mark.label, transform=trans, color=mark.color, fontsize=8,
            ha="center", va="bottom", clip_on=False,
        )  # fmt: skip


def _legend(ax: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="best", frameon=False)


def _loss_figure(
    df: pd.DataFrame, steps: np.ndarray, marks: Sequence[_Mark], buckets: int, log: bool
) -> Any | None:
    train = _series(df, "train/loss", steps, buckets)
    val = _series(df, "val/loss", steps, buckets)
    if train is None and val is None:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    if train is not None:
        col = numeric_column(df, "train/loss")
        assert col is not None
        y = col.to_numpy()
        mask = np.isfinite(y)
        ax.plot(train.x, train.y, color=_PALETTE[0], alpha=0.3, linewidth=0.7, label="train (raw)")
        sx, sy = _smooth(steps[mask], y[mask], buckets)
        ax.plot(sx, sy, color=_PALETTE[0], linewidth=1.6, label="train (smoothed)")
    if val is not None:
        marker = "o" if len(val.x) <= 100 else None
        ax.plot(
            val.x,
            val.y,
            color=_PALETTE[1],
            linewidth=1.4,
            marker=marker,
            markersize=3,
            label="validation",
        )
    bad = _nonfinite_steps(df, "train/loss", steps)
    if len(bad):
        from matplotlib.transforms import blended_transform_factory

        trans = blended_transform_factory(ax.transData, ax.transAxes)
        shown = bad[:: max(1, len(bad) // 200)]
        ax.plot(
            shown,
            np.full(len(shown), 0.97),
            "x",
            color="#b71c1c",
            transform=trans,
            label="non-finite loss",
        )
    if log:
        ax.set_yscale("log")
    _style_axes(ax, ylabel="loss" + (" (log)" if log else ""))
    _draw_marks(ax, marks)
    _legend(ax)
    return fig


def _lines_figure(
    series: Sequence[_Series],
    marks: Sequence[_Mark],
    *,
    ylabel: str = "",
    hline: tuple[float, str] | None = None,
    twin: Sequence[_Series] = (),
    twin_label: str = "",
    logy: bool = False,
) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        ax.plot(s.x, s.y, color=_PALETTE[i % len(_PALETTE)], linewidth=1.0, label=_literal(s.name))
    if hline is not None:
        ax.axhline(hline[0], color="#6d4c41", linestyle=":", linewidth=1.4, label=hline[1])
    if logy:
        ax.set_yscale("log")
    _style_axes(ax, ylabel=ylabel)
    if twin:
        ax2 = ax.twinx()
        for j, s in enumerate(twin, start=len(series)):
            ax2.plot(
                s.x, s.y, color=_PALETTE[j % len(_PALETTE)], linewidth=1.0, linestyle="--",
                label=_literal(s.name),
            )  # fmt: skip
        ax2.set_ylabel(twin_label)
        ax2.spines["top"].set_visible(False)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best", frameon=False)
    else:
        _legend(ax)
    _draw_marks(ax, marks)
    return fig


def _heatmap_figure(
    df: pd.DataFrame,
    cols: Sequence[str],
    prefix: str,
    steps: np.ndarray,
    marks: Sequence[_Mark],
    buckets: int,
) -> Any:
    """Layers x step buckets, colour = log10 of the bucket's max (so spikes show)."""
    from matplotlib.colors import LogNorm

    n = len(steps)
    nb = max(1, min(buckets // 4, n))
    edges = np.linspace(0, n, nb + 1).astype(np.int64)
    rows = []
    for c in cols:
        col = numeric_column(df, c)
        y = (
            np.where(np.isfinite(col.to_numpy()), col.to_numpy(), np.nan)
            if col is not None
            else np.full(n, np.nan)
        )
        starts = edges[:-1][edges[:-1] < n]
        filled = np.where(np.isnan(y), -np.inf, y)
        mx = np.maximum.reduceat(filled, starts) if len(starts) else np.empty(0)
        rows.append(np.where(np.isfinite(mx), mx, np.nan))
    grid = np.ma.masked_invalid(np.vstack(rows))
    positive = grid[grid > 0]
    fig = _figure(height=max(2.6, min(8.0, 0.9 + 0.18 * len(cols))))
    ax = fig.add_subplot()
    norm = None
    if positive.count() and float(positive.max()) > 0:
        norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
        grid = np.ma.masked_where(~(grid > 0), grid)
    extent = (
        float(steps[0]),
        float(steps[-1]) if n > 1 else float(steps[0]) + 1,
        len(cols) - 0.5,
        -0.5,
    )
    im = ax.imshow(
        grid, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm, extent=extent
    )
    ax.set_yticks(range(len(cols)))
    ax.set_yticklabels([_literal(c[len(prefix) :]) for c in cols], fontsize=7)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, pad=0.01)
    _draw_marks(ax, marks)
    return fig


_LAYER_CHARTS = (
    ("layer-grad-norms", "grad_norm/"),
    ("layer-act-rms", "act_rms/"),
    ("attn-entropy", "attn/entropy/"),
    ("attn-max-logit", "attn/max_logit/"),
)
_LAYER_TITLES = {
    "layer-grad-norms": "Per-layer gradient norms",
    "layer-act-rms": "Per-layer activation RMS",
    "attn-entropy": "Attention entropy per layer (nats)",
    "attn-max-logit": "Attention max logit per layer",
}


def _present(
    df: pd.DataFrame, steps: np.ndarray, names: Sequence[str], buckets: int
) -> list[_Series]:
    out = []
    for name in names:
        s = _series(df, name, steps, buckets)
        if s is not None:
            out.append(s)
    return out


def _marks_by_chart(
    findings: Sequence[Finding], available: Sequence[str]
) -> dict[str, list[_Mark]]:
    marks: dict[str, list[_Mark]] = {}
    for number, finding in enumerate(findings, start=1):
        keys = chart_keys_for_finding(finding, available)
        color = SEVERITY_COLORS.get(finding.severity, "#555555")
        for step in finding_steps(finding):
            for key in keys:
                marks.setdefault(key, []).append(_Mark(step, str(number), color))
    return marks


def _planned(df: pd.DataFrame) -> list[str]:
    """Chart keys the history has data for (so findings can be linked before drawing)."""
    cols = set(df.columns)
    has = lambda *names: any(n in cols for n in names)  # noqa: E731
    keys = []
    if has("train/loss", "val/loss"):
        keys.append("loss")
    for key, names in _SIMPLE.items():
        if has(*names[0]) or has(*names[1]):
            keys.append(key)
    for key, prefix in _LAYER_CHARTS:
        if any(c.startswith(prefix) for c in cols):
            keys.append(key)
    return keys


# key -> (left-axis metrics, right-axis metrics)
_SIMPLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
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
_SIMPLE_TITLES = {
    "lr": ("Learning rate", "lr", ""),
    "grad-norm": (
        "Gradient norm (before clipping)",
        "global grad norm",
        "fraction of steps clipped",
    ),
    "update-ratio": ("Update / weight ratio", "|Δw| / |w|", ""),
    "throughput": ("Throughput and MFU", "tokens / s", "MFU"),
    "step-time": ("Step and data-loading time", "seconds", ""),
    "memory": ("Memory", "GB", ""),
    "utilization": ("GPU and CPU utilisation", "%", ""),
}


def build_charts(
    df: pd.DataFrame,
    meta: Mapping[str, Any] | None = None,
    findings: Sequence[Finding] = (),
    *,
    buckets: int = 1000,
    only: Iterable[str] | None = None,
) -> list[Chart]:
    """Draw every chart the history has data for.

    Args:
        df: the history (``step`` column plus metric columns).
        meta: meta.json (the clip threshold is read from its config).
        findings: numbered 1.. in this order; their steps are marked on their charts.
        buckets: downsampling buckets per series (each keeps its min and max).
        only: draw only the charts with these keys (all by default).

    Returns:
        The charts, in reading order; none for metrics the history lacks.
    """
    import matplotlib

    steps = df["step"].to_numpy(dtype=np.float64)
    available = _planned(df)
    marks = _marks_by_chart(findings, available)
    if only is not None:
        wanted = set(only)
        available = [k for k in available if k in wanted]
    note = f"{len(df):,} rows" + (
        f", drawn as min/max of {buckets:,} buckets" if len(df) > 2 * buckets else ""
    )
    charts: list[Chart] = []
    with matplotlib.rc_context({"font.size": 10, "legend.fontsize": 9}):
        if "loss" in available:
            lin = _loss_figure(df, steps, marks.get("loss", []), buckets, log=False)
            log = _loss_figure(df, steps, marks.get("loss", []), buckets, log=True)
            if lin is not None:
                charts.append(
                    Chart(
                        key="loss",
                        title="Loss",
                        svg=_to_svg(lin, "loss"),
                        svg_log=_to_svg(log, "loss-log") if log is not None else None,
                        metrics=tuple(m for m in ("train/loss", "val/loss") if m in df.columns),
                        note=note + "; smoothed = exponential moving average",
                    )
                )
        clip = clip_threshold(meta)
        for key, (left_names, right_names) in _SIMPLE.items():
            if key not in available:
                continue
            left = _present(df, steps, left_names, buckets)
            right = _present(df, steps, right_names, buckets)
            if not left and not right:
                continue
            if not left:
                left, right = right, []
            title, ylabel, twin_label = _SIMPLE_TITLES[key]
            hline = (clip, f"clip threshold {clip:g}") if key == "grad-norm" and clip else None
            logy = key in ("grad-norm", "update-ratio") and _wide_range(left)
            fig = _lines_figure(
                left, marks.get(key, []), ylabel=ylabel, hline=hline, twin=right,
                twin_label=twin_label, logy=logy,
            )  # fmt: skip
            extra = f"; clip threshold from the run config: {clip:g}" if hline else ""
            charts.append(
                Chart(
                    key=key,
                    title=title,
                    svg=_to_svg(fig, key),
                    metrics=tuple(s.name for s in (*left, *right)),
                    note=note + extra,
                )
            )
        for key, prefix in _LAYER_CHARTS:
            if key not in available:
                continue
            cols = [c for c in df.columns if c.startswith(prefix)]
            series = _present(df, steps, cols, buckets)
            if not series:
                continue
            if len(series) <= _MAX_LAYER_LINES:
                for s in series:
                    s.name = s.name[len(prefix) :]
                fig = _lines_figure(
                    series, marks.get(key, []), ylabel=prefix.rstrip("/"), logy=_wide_range(series)
                )
                what = note
            else:
                fig = _heatmap_figure(
                    df, [s.name for s in series], prefix, steps, marks.get(key, []), buckets
                )
                what = note + f"; {len(series)} layers, colour = max per bucket (log scale)"
            charts.append(
                Chart(
                    key=key,
                    title=_LAYER_TITLES[key],
                    svg=_to_svg(fig, key),
                    metrics=tuple(cols),
                    note=what,
                )
            )
    return charts


def _wide_range(series: Sequence[_Series]) -> bool:
    """True when the positive values span more than two decades (log axis reads better)."""
    vals = [s.y[s.y > 0] for s in series]
    vals = [v for v in vals if len(v)]
    if not vals or any((s.y <= 0).any() for s in series):
        return False
    lo = min(float(v.min()) for v in vals)
    hi = max(float(v.max()) for v in vals)
    return hi / lo > 100.0

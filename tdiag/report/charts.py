"""Charts of a run's history, drawn with matplotlib (Agg, no pyplot state) as inline SVG.

Long series are bucketed before drawing: the points are cut into at most ``buckets`` runs
of consecutive points, each drawn as its mean (the line) and its minimum and maximum (a
band), so a one-step spike in a million-step run still shows, noise does not turn the line
into a solid block, and the page stays small. Steps that findings point at are drawn as
vertical lines (spans as bands) numbered like the findings.
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
from tdiag.report.rules.memory import gpu_capacity
from tdiag.report.summary import logged_mask, numeric_column

__all__ = [
    "Chart",
    "bucket_envelope",
    "build_charts",
    "chart_keys_for_finding",
    "clip_threshold",
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
    "train.lr-too-high": ("loss", "lr", "update-ratio"),
    "train.lr-too-low": ("loss", "lr"),
    "train.grad-norm-growth": ("grad-norm",),
    "train.clipping-frequent": ("grad-norm",),
    "train.overfitting": ("loss",),
    "train.early-stop": ("loss",),
    "train.skipped-steps": ("loss",),
    "perf.gpu-underutilized": ("utilization", "throughput"),
    "perf.data-stall": ("step-time", "throughput"),
    "perf.throughput-degradation": ("throughput", "step-time"),
    "perf.low-mfu": ("throughput",),
    "mem.near-capacity": ("memory",),
    "mem.leak": ("memory",),
    "dist.straggler": ("step-time",),
    "data.unshuffled": ("loss",),
    "data.label-leak": ("loss",),
    # the Monitor's loop findings (events.jsonl)
    "loop.grad-accumulating": ("grad-norm", "loss"),
    "loop.clip-after-step": ("grad-norm",),
    "loop.params-not-updated": ("loss", "update-ratio"),
    "loop.optimizer-replaced": ("loss",),
    "data.repeated-batch": ("loss",),
    "dist.weights-desync": ("loss",),
}
_PREFIX_CHARTS = {
    "train.": ("loss",),
    "loop.": ("loss",),
    "data.": ("loss",),
    "perf.": ("throughput", "step-time"),
    "mem.": ("memory",),
    "dist.": ("step-time",),
    "grad.": ("grad-norm",),
    "attn.": ("attn-entropy", "attn-max-logit"),
}
# Legend labels of the Contract-3 metrics (the chart header lists the raw names).
_LABELS = {
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
    """A finding's place on a chart: a step (``end`` None) or a span of steps.

    Only the ``primary`` mark of a finding carries its number; its other steps are drawn
    fainter and unlabelled, so a finding with many steps does not print its number 20 times.
    """

    step: int
    label: str
    color: str
    end: int | None = None
    primary: bool = True


@dataclass
class _Series:
    """A series to draw. A long one is bucketed: ``y`` is each bucket's mean at its mean
    step ``x``, and ``lo``/``hi`` its minimum and maximum (drawn as a band)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    total: int = 0
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


# ---------------------------------------------------------------- data preparation


def _series(df: pd.DataFrame, name: str, steps: np.ndarray, buckets: int) -> _Series | None:
    col = numeric_column(df, name)
    if col is None:
        return None
    y = col.to_numpy()
    mask = np.isfinite(y)
    if not mask.any():
        return None
    x, y = steps[mask], y[mask]
    if len(y) <= 2 * buckets:
        return _Series(name, x, y, total=len(y))
    xc, lo, mean, hi = bucket_envelope(x, y, buckets)
    return _Series(name, xc, mean, total=len(y), lo=lo, hi=hi)


def bucket_envelope(
    x: np.ndarray, y: np.ndarray, buckets: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut finite ``y`` into ``buckets`` runs of consecutive points: (mean x, min, mean, max)
    of each. Min and max keep a one-step spike visible; the mean keeps noise from turning a
    million-point line into a solid block. O(len(y)), vectorised."""
    n = len(y)
    size = max(1, math.ceil(n / buckets))
    starts = np.arange(0, n, size)
    counts = np.diff(np.append(starts, n))
    lo = np.minimum.reduceat(y, starts)
    hi = np.maximum.reduceat(y, starts)
    mean = np.add.reduceat(y, starts) / counts
    xc = np.add.reduceat(x.astype(np.float64), starts) / counts
    return xc, lo, mean, hi


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


def finding_span(finding: Finding) -> tuple[int, int] | None:
    """The span of steps a finding judged (``evidence["step_range"]``: [first, last]), or None.

    Rules that judge a stretch of the run (data stall, low utilisation, a leak …) give one;
    it is drawn as a shaded band rather than as two lines.
    """
    span = finding.evidence.get("step_range") if isinstance(finding.evidence, Mapping) else None
    if not isinstance(span, list | tuple) or len(span) != 2:
        return None
    a, b = span
    ok = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in span
    )
    return (int(min(a, b)), int(max(a, b))) if ok else None


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

# Width in inches of every chart. The SVG is scaled to its box (~540 px on a desktop, ~350 px
# on a phone), so this sets the text size: 10 pt text reads ~10 px on a phone, ~16 px on a desktop.
_FIG_WIDTH = 4.8
# Mark labels closer than this fraction of the x axis are merged ("1,3") so they never overlap.
_LABEL_GAP = 0.05


def _figure(height: float = 3.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(_FIG_WIDTH, height), layout="constrained")


_ID_RE = re.compile(r'\bid="([^"]+)"')
_PATH_RE = re.compile(r'\bd="([^"]*)"')
_DECIMALS_RE = re.compile(r"(\d\.\d\d)\d+")


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
    # Path coordinates to 0.01 pt (matplotlib writes 1e-6): a third less HTML, same picture.
    svg = _PATH_RE.sub(lambda m: 'd="' + _DECIMALS_RE.sub(r"\1", m.group(1)) + '"', svg)
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


def _dot(x: np.ndarray) -> str | None:
    """A marker for series too short to draw as a line (one point is an invisible line)."""
    return "o" if len(x) < 3 else None


def _label(name: str) -> str:
    return _LABELS.get(name) or _literal(name)


def _step_label(value: float, _pos: Any = None) -> str:
    """Step ticks as 250, 20k, 1.5M: a million-step axis stays short and never uses 1e6."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale and abs(value) >= 10_000:
            return f"{value / scale:.4g}{unit}"
    return f"{value:.4g}"


def _style_axes(ax: Any, *, ylabel: str = "", xlabel: bool = True) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
    ax.grid(True, color="#e0e0e0", linewidth=0.6)
    if xlabel:
        ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _draw_marks(ax: Any, marks: Sequence[_Mark], *, labels: bool = True) -> None:
    """Vertical lines (or shaded spans) at the steps findings point at, numbered above the
    axes like the findings; labels that would overlap are merged into one ("1,3")."""
    from matplotlib.transforms import blended_transform_factory

    labelled = []
    for m in marks:
        if m.end is not None and m.end > m.step:
            ax.axvspan(m.step, m.end, color=m.color, alpha=0.08, linewidth=0, zorder=0)
            ax.axvline(m.step, color=m.color, linewidth=0.8, linestyle="--", alpha=0.6, zorder=1)
        else:
            strong = 1.0 if m.primary else 0.6
            ax.axvline(
                m.step, color=m.color, linewidth=strong, linestyle="--",
                alpha=0.85 if m.primary else 0.35, zorder=1,
            )  # fmt: skip
        if m.primary:
            labelled.append(m)
    if not labels or not labelled:
        return
    x0, x1 = ax.get_xlim()
    width = abs(x1 - x0) or 1.0
    clusters: list[list[_Mark]] = []
    for m in sorted(labelled, key=lambda m: m.step):
        if clusters:
            text = ",".join(c.label for c in clusters[-1])
            if (m.step - clusters[-1][0].step) / width < _LABEL_GAP + 0.012 * len(text):
                clusters[-1].append(m)
                continue
        clusters.append([m])
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for cluster in clusters:
        names = sorted(dict.fromkeys(m.label for m in cluster), key=lambda t: (len(t), t))
        colors = {m.color for m in cluster}
        ax.text(
            cluster[0].step, 1.01, ",".join(names), transform=trans, fontsize=9,
            color=cluster[0].color if len(colors) == 1 else "#333333", fontweight="bold",
            ha="center", va="bottom", clip_on=False,
        )  # fmt: skip


def _legend(fig: Any, axes: Sequence[Any], *, always: bool = False) -> None:
    """One legend below the plot (never over the data); none when every panel draws a single
    series (the chart's header and axis labels already name it)."""
    handles, labels, crowded = [], [], False
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        crowded |= len(h) > 1 or always
        handles.extend(h)
        labels.extend(lab)
    if handles and crowded:
        ncols = min(3 if sum(len(t) for t in labels[:3]) <= 48 else 2, len(handles))
        fig.legend(
            handles, labels, loc="outside lower center", ncols=ncols,
            frameon=False, fontsize=9, handlelength=1.8, columnspacing=1.2,
        )  # fmt: skip


def _nonfinite_markers(ax: Any, bad: np.ndarray, label: str) -> None:
    """Crosses along the top of the axes at steps where a metric was logged NaN/Inf."""
    if not len(bad):
        return
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    shown = bad[:: max(1, len(bad) // 200)]
    ax.plot(
        shown, np.full(len(shown), 0.96), "x", color="#b71c1c", markersize=5, transform=trans,
        label=label, clip_on=False,
    )  # fmt: skip


def _loss_figure(
    df: pd.DataFrame,
    steps: np.ndarray,
    marks: Sequence[_Mark],
    buckets: int,
    log: bool,
    xlim: tuple[float, float] | None,
) -> Any | None:
    train = _series(df, "train/loss", steps, buckets)
    val = _series(df, "val/loss", steps, buckets)
    if train is None and val is None:
        return None
    fig = _figure(3.2)
    ax = fig.add_subplot()
    if train is not None:
        col = numeric_column(df, "train/loss")
        assert col is not None
        y = col.to_numpy()
        mask = np.isfinite(y)
        if train.lo is not None and train.hi is not None:
            ax.fill_between(
                train.x, train.lo, train.hi, color=_PALETTE[0], alpha=0.25, linewidth=0,
                label="train (min–max per bucket)",
            )  # fmt: skip
        else:
            ax.plot(
                train.x, train.y, color=_PALETTE[0], alpha=0.35, linewidth=0.8,
                label="train (raw)", marker=_dot(train.x),
            )  # fmt: skip
        sx, sy = _smooth(steps[mask], y[mask], buckets)
        ax.plot(sx, sy, color=_PALETTE[0], linewidth=1.6, label="train (smoothed)")
    if val is not None:
        marker = "o" if len(val.x) <= 100 else None
        ax.plot(
            val.x, val.y, color=_PALETTE[1], linewidth=1.4, marker=marker, markersize=3,
            label="validation",
        )  # fmt: skip
    _nonfinite_markers(ax, _nonfinite_steps(df, "train/loss", steps), "non-finite loss")
    if log:
        ax.set_yscale("log")
    _style_axes(ax, ylabel="loss" + (" (log)" if log else ""))
    if xlim is not None:
        ax.set_xlim(xlim)
    _draw_marks(ax, marks)
    _legend(fig, [ax], always=True)
    return fig


def _draw_series(ax: Any, s: _Series, color: str) -> None:
    """A line; for a bucketed series the bucket means as the line over a min–max band."""
    if s.lo is not None and s.hi is not None:
        ax.fill_between(s.x, s.lo, s.hi, color=color, alpha=0.25, linewidth=0)
    ax.plot(s.x, s.y, color=color, linewidth=1.0, label=_label(s.name), marker=_dot(s.x))


def _lines_figure(
    series: Sequence[_Series],
    marks: Sequence[_Mark],
    *,
    ylabel: str = "",
    hline: tuple[float, str] | None = None,
    lower: Sequence[_Series] = (),
    lower_label: str = "",
    logy: bool = False,
    from_zero: bool = False,
    xlim: tuple[float, float] | None = None,
    nonfinite: tuple[np.ndarray, str] | None = None,
) -> Any:
    """Lines of ``series``; ``lower`` series go to a shorter panel below with the same steps
    (two y axes on one panel hide each other when the series move together, as MFU and
    tokens/s do)."""
    if lower:
        fig = _figure(3.6)
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2.4, 1.0))
    else:
        fig = _figure()
        ax, ax2 = fig.add_subplot(), None
    for i, s in enumerate(series):
        _draw_series(ax, s, _PALETTE[i % len(_PALETTE)])
    if hline is not None:
        ax.axhline(hline[0], color="#6d4c41", linestyle=":", linewidth=1.4, label=hline[1])
    if nonfinite is not None:
        _nonfinite_markers(ax, *nonfinite)
    if logy:
        ax.set_yscale("log")
    elif from_zero:
        ax.set_ylim(bottom=0)
    _style_axes(ax, ylabel=ylabel, xlabel=ax2 is None)
    if ax2 is not None:
        for j, s in enumerate(lower, start=len(series)):
            _draw_series(ax2, s, _PALETTE[j % len(_PALETTE)])
        ax2.set_ylim(bottom=0)
        _style_axes(ax2, ylabel=lower_label)
    if xlim is not None:
        ax.set_xlim(xlim)
    _draw_marks(ax, marks)
    if ax2 is not None:
        _draw_marks(ax2, marks, labels=False)
    _legend(fig, [ax] if ax2 is None else [ax, ax2])
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

    values = []
    for c in cols:
        col = numeric_column(df, c)
        y = col.to_numpy() if col is not None else np.full(len(steps), np.nan)
        values.append(np.where(np.isfinite(y), y, np.nan))
    # Only the rows that carry these metrics (a validation row in between would otherwise
    # make an empty column), bucketed by position.
    carried = np.zeros(len(steps), dtype=bool)
    for y in values:
        carried |= ~np.isnan(y)
    steps = steps[carried]
    n = len(steps)
    nb = max(1, min(buckets // 4, n))
    starts = np.unique(np.linspace(0, n, nb + 1).astype(np.int64)[:-1])
    rows = []
    for y in values:
        filled = np.where(np.isnan(y[carried]), -np.inf, y[carried])
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
    ax.set_yticklabels(
        [_literal(c[len(prefix) :]) for c in cols], fontsize=8 if len(cols) <= 16 else 7
    )
    _style_axes(ax)
    ax.grid(False)
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
        span = finding_span(finding)
        if span is not None:
            found = [_Mark(span[0], str(number), color, end=span[1])]
        else:  # the finding's own step carries the number; its other steps are fainter
            found = [
                _Mark(step, str(number), color, primary=i == 0)
                for i, step in enumerate(finding_steps(finding))
            ]
        for key in keys:
            marks.setdefault(key, []).extend(found)
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


# key -> (main panel metrics, lower panel metrics)
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
    "grad-norm": ("Gradient norm (before clipping)", "global grad norm", "clipped"),
    "update-ratio": ("Update / weight ratio", "|Δw| / |w|", ""),
    "throughput": ("Throughput and MFU", "tokens / s", "MFU"),
    "step-time": ("Step and data-loading time", "seconds", ""),
    "memory": ("Memory", "GB", ""),
    "utilization": ("GPU and CPU utilisation", "%", ""),
}
# Charts whose quantities are >= 0 and read wrong on an axis that does not start at 0 (a
# flat 0.352 GB drawn from 0.351 looks like a leak).
_FROM_ZERO = ("lr", "throughput", "step-time", "memory", "utilization")


def _title(key: str, series: Sequence[_Series]) -> str:
    """The chart title, naming only what is drawn (no "GPU" on a CPU-only run)."""
    if key == "utilization":
        names = {s.name for s in series}
        gpu, cpu = "sys/gpu_util" in names, "sys/cpu_percent" in names
        return (
            "GPU and CPU utilisation" if gpu and cpu else ("GPU" if gpu else "CPU") + " utilisation"
        )
    if key == "throughput" and not any(s.name == "perf/mfu" for s in series):
        return "Throughput"
    return _SIMPLE_TITLES[key][0]


def _x_range(steps: np.ndarray) -> tuple[float, float] | None:
    """The same step axis on every chart (so charts line up), with a small margin."""
    if len(steps) == 0:
        return None
    lo, hi = float(np.min(steps)), float(np.max(steps))
    if hi <= lo:
        return None
    pad = 0.02 * (hi - lo)
    return lo - pad, hi + pad


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
    xlim = _x_range(steps)
    available = _planned(df)
    marks = _marks_by_chart(findings, available)
    if only is not None:
        wanted = set(only)
        available = [k for k in available if k in wanted]
    note = f"{len(df):,} rows" + (
        f", drawn in {buckets:,} buckets: mean as a line, min–max as a band"
        if len(df) > 2 * buckets
        else ""
    )
    charts: list[Chart] = []
    with matplotlib.rc_context({"font.size": 10, "legend.fontsize": 9}):
        if "loss" in available:
            lin = _loss_figure(df, steps, marks.get("loss", []), buckets, False, xlim)
            log = _loss_figure(df, steps, marks.get("loss", []), buckets, True, xlim)
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
            _, ylabel, lower_label = _SIMPLE_TITLES[key]
            if not left:  # only the lower panel's metric: draw it as the main one
                left, right, ylabel = right, [], lower_label
            title = _title(key, (*left, *right))
            hline = (clip, f"clip threshold {clip:g}") if key == "grad-norm" and clip else None
            if key == "memory" and any(s.name.startswith("sys/gpu_mem") for s in left):
                cap = gpu_capacity(df, meta)
                hline = (cap[0], f"GPU capacity {cap[0]:g} GB") if cap else None
            logy = key in ("grad-norm", "update-ratio") and _wide_range(left)
            bad = None
            if key == "grad-norm":
                bad = (_nonfinite_steps(df, "train/grad_norm", steps), "non-finite grad norm")
            fig = _lines_figure(
                left, marks.get(key, []), ylabel=ylabel, hline=hline, lower=right,
                lower_label=lower_label, logy=logy, from_zero=key in _FROM_ZERO, xlim=xlim,
                nonfinite=bad,
            )  # fmt: skip
            extra = ""
            if hline is not None:
                extra = (
                    f"; clip threshold from the run config: {clip:g}"
                    if key == "grad-norm"
                    else "; dotted line: the GPU's memory capacity"
                )
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
                    series, marks.get(key, []), ylabel=prefix.rstrip("/"),
                    logy=_wide_range(series), xlim=xlim,
                )  # fmt: skip
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

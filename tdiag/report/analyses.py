"""Analyses: pure functions on a run's metric history (pandas), no I/O, no HTML.

Everything here is vectorised (pandas rolling windows, numpy cumulative sums): no Python
loop runs over rows, so a history of 1,000,000 steps costs a fraction of a second per
metric. The report's rules (``tdiag.report.rules``) turn these numbers into Findings.

Conventions:
    * a *series* is a float ``pd.Series`` indexed by the training step (int), sorted,
      one value per step, as returned by :func:`metric`;
    * windows count logged points, not steps (a run logged every 10 steps with a window
      of 5 looks at 50 steps);
    * "robust" means median/MAD based: one bad batch does not move the baseline.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = [
    "MAD_TO_SIGMA",
    "ChangePoint",
    "LinearFit",
    "auto_window",
    "change_points",
    "correlation",
    "ema",
    "first_nonfinite_step",
    "has_metric",
    "linear_fit",
    "log_linear_fit",
    "metric",
    "nonfinite_steps",
    "plateau_start",
    "relative_change",
    "robust_smooth",
    "rolling_linear_slope",
    "rolling_mad",
    "rolling_median",
    "spikes",
    "steady_part",
    "sustained_from",
]

# For Gaussian noise the MAD is sigma * 0.6745; multiplying by 1.4826 turns a MAD into a
# sigma estimate that one outlier cannot inflate (Hampel 1974).
MAD_TO_SIGMA = 1.4826


# --------------------------------------------------------------------------- extraction
def metric(df: pd.DataFrame, name: str, *, finite: bool = True) -> pd.Series:
    """One metric as a float series indexed by step.

    Rows that do not carry the metric (NaN in a sparse history) are dropped; a step logged
    twice keeps its last value; steps are sorted.

    Args:
        df: the history (``step`` column plus one column per metric), as read by
            ``tdiag.history.read_history``.
        name: the metric name, e.g. ``"train/loss"``.
        finite: drop +-Infinity too (NaN is always dropped: in a sparse history a NaN
            cell cannot be told apart from a missing one, see :func:`nonfinite_steps`).

    Returns:
        The series (empty, float, when the column is absent or holds no number).
    """
    if name not in df.columns or "step" not in df.columns:
        return pd.Series([], dtype=float, index=pd.Index([], dtype=np.int64, name="step"))
    values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
    steps = df["step"].to_numpy()
    keep = np.isfinite(values) if finite else ~np.isnan(values)
    s = pd.Series(values[keep], index=pd.Index(steps[keep], name="step"), name=name)
    if not s.index.is_monotonic_increasing:
        s = s.sort_index(kind="stable")
    if s.index.has_duplicates:
        s = s[~s.index.duplicated(keep="last")]
    return s


def has_metric(df: pd.DataFrame, name: str, *, min_points: int = 1) -> bool:
    """True when ``name`` has at least ``min_points`` finite values."""
    if name not in df.columns:
        return False
    col = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
    return int(np.isfinite(col).sum()) >= min_points


def nonfinite_steps(df: pd.DataFrame, name: str, companions: tuple[str, ...] = ()) -> pd.Index:
    """Steps at which ``name`` was *logged* non-finite (NaN, +-Inf).

    A sparse history reads a missing cell as NaN too, so a NaN counts as logged when the
    row carries one of ``companions`` (metrics written together with ``name``, e.g. the LR
    beside the loss), or, when the history has none of the companions, when the row
    carries nothing at all besides ``step``/``time`` (a row written for this metric
    alone). With companions present an all-NaN row proves nothing: ``{"step": 40,
    "val/loss": NaN}`` reads the same, and must not make a NaN training loss. Infinities
    are always logged values.
    """
    if name not in df.columns:
        return pd.Index([], dtype=np.int64, name="step")
    values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
    isinf = np.isinf(values)
    isnan = np.isnan(values)
    present = [c for c in companions if c in df.columns]
    comp = np.zeros(len(df), dtype=bool)
    for c in present:  # loop over a few columns, not rows
        comp |= ~np.isnan(pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float))
    # Only the NaN rows without a companion need the (costlier) "is the row empty" test.
    maybe = np.flatnonzero(isnan & ~comp)
    empty_row = np.zeros(len(df), dtype=bool)
    others = [c for c in df.columns if c not in ("step", "time", name)]
    if len(maybe) and not present:
        empty_row[maybe] = df.iloc[maybe][others].isna().all(axis=1).to_numpy() if others else True
    mask = isinf | (isnan & (comp | empty_row))
    dropped = df.attrs.get("tdiag_dropped_rows", {}).get(name)  # tdiag.history.DROPPED_ATTR
    if dropped:  # cells the reader dropped (not numbers in the file): missing, not logged
        mask &= ~df.index.isin(dropped)
    steps = df["step"].to_numpy()[mask]
    return pd.Index(np.unique(steps), name="step")


def first_nonfinite_step(
    df: pd.DataFrame, name: str, companions: tuple[str, ...] = ()
) -> int | None:
    """The first step at which ``name`` was logged non-finite, or None."""
    idx = nonfinite_steps(df, name, companions)
    return int(idx[0]) if len(idx) else None


def steady_part(s: pd.Series, skip_frac: float = 0.1, *, min_points: int = 3) -> pd.Series:
    """Drop the first ``skip_frac`` of the step range (warm-up, compilation, caches filling).

    Keeps everything when that would leave fewer than ``min_points`` points.
    """
    if len(s) == 0:
        return s
    first, last = s.index[0], s.index[-1]
    cut = first + skip_frac * (last - first)
    out = s[s.index >= cut]
    return out if len(out) >= min_points else s


# ---------------------------------------------------------------------------- smoothing
def auto_window(n: int, frac: float = 0.02, lo: int = 5, hi: int = 201) -> int:
    """An odd window of about ``frac`` of ``n`` points, clamped to [lo, hi]."""
    w = int(max(lo, min(hi, round(n * frac))))
    return w if w % 2 else w + 1


def rolling_median(s: pd.Series, window: int, *, center: bool = False) -> pd.Series:
    """Rolling median over ``window`` points (partial windows at the edges)."""
    return s.rolling(window, min_periods=1, center=center).median()


def ema(s: pd.Series, *, span: float | None = None, alpha: float | None = None) -> pd.Series:
    """Exponential moving average (no bias correction: ``adjust=False``)."""
    if (span is None) == (alpha is None):
        raise ValueError(f"give exactly one of span or alpha, got span={span!r} alpha={alpha!r}")
    return s.ewm(span=span, alpha=alpha, adjust=False).mean()


def robust_smooth(s: pd.Series, window: int | None = None) -> pd.Series:
    """Centered rolling median (kills isolated spikes) followed by a light EMA (kills jitter).

    ``window`` defaults to :func:`auto_window` of the series length.
    """
    if len(s) == 0:
        return s
    w = window or auto_window(len(s))
    med = rolling_median(s, w, center=True)
    return ema(med, span=max(2.0, w / 2))


def rolling_mad(s: pd.Series, window: int, *, center: bool = False) -> pd.Series:
    """Rolling median absolute deviation from the rolling median.

    An approximation of the windowed MAD that stays O(n log w): the deviation of each point
    is taken from the median of *its own* window, then the deviations are median-filtered.
    """
    med = rolling_median(s, window, center=center)
    return (s - med).abs().rolling(window, min_periods=1, center=center).median()


# ------------------------------------------------------------------------------- spikes
def spikes(
    s: pd.Series,
    *,
    window: int = 21,
    z: float = 6.0,
    rel: float = 0.25,
    min_history: int = 5,
) -> pd.DataFrame:
    """Upward spikes against the trailing rolling median, with a robust noise scale.

    The baseline of point i is the median of the ``window`` points before it. The noise
    scale is taken from first differences, ``sigma = 1.4826 * median(|dx|) / sqrt(2)`` over
    the same trailing window: differences cancel a trend (a loss falling fast early in
    training would otherwise inflate a MAD around a lagging median and hide spikes), and
    the median ignores the two large differences a spike itself makes. A point is a spike
    when it exceeds the baseline by more than ``z`` sigmas AND by more than ``rel`` of the
    baseline (the relative floor stops a very smooth curve, whose noise is tiny, from
    flagging ordinary wiggles).

    Returns:
        DataFrame indexed by step with columns ``value``, ``baseline`` (trailing median),
        ``sigma`` (robust), ``robust_z`` and ``ratio`` (value / baseline); empty if none.
    """
    cols = ["value", "baseline", "sigma", "robust_z", "ratio"]
    if len(s) <= min_history:
        return pd.DataFrame(columns=cols, index=pd.Index([], name="step"), dtype=float)
    prev = s.shift(1)
    base = prev.rolling(window, min_periods=min_history).median()
    absdiff = prev.diff().abs()
    med_diff = absdiff.rolling(window, min_periods=min_history - 1).median()
    # A perfectly flat stretch has zero differences: use a tiny floor so z stays finite.
    sigma = np.maximum(med_diff * (MAD_TO_SIGMA / math.sqrt(2.0)), 1e-12 + 1e-9 * base.abs())
    robust_z = (s - base) / sigma
    ratio = s / base.where(base != 0)
    mask = (robust_z > z) & ((s - base) > rel * base.abs())
    out = pd.DataFrame(
        {"value": s, "baseline": base, "sigma": sigma, "robust_z": robust_z, "ratio": ratio}
    )[mask.fillna(False).to_numpy()]
    return out


# ------------------------------------------------------------------------------- trends
@dataclass(frozen=True)
class LinearFit:
    """Least-squares line ``y = slope * x + intercept`` with its R^2 and point count."""

    slope: float
    intercept: float
    r2: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def linear_fit(x: np.ndarray | pd.Index, y: np.ndarray | pd.Series) -> LinearFit:
    """Ordinary least squares of ``y`` on ``x`` (closed form, O(n)).

    Returns NaNs for fewer than 2 points or a constant ``x``.
    """
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    n = len(xa)
    if n < 2:
        return LinearFit(math.nan, math.nan, math.nan, n)
    xm, ym = xa.mean(), ya.mean()
    dx, dy = xa - xm, ya - ym
    sxx = float(dx @ dx)
    if sxx == 0.0:
        return LinearFit(math.nan, math.nan, math.nan, n)
    slope = float(dx @ dy) / sxx
    syy = float(dy @ dy)
    r2 = 1.0 if syy == 0.0 else (slope * float(dx @ dy)) / syy
    return LinearFit(slope, float(ym - slope * xm), float(r2), n)


def log_linear_fit(s: pd.Series) -> LinearFit:
    """Fit ``log(s) = slope * step + c`` on the positive values of ``s``.

    ``exp(slope * 1000)`` is the growth factor per 1000 steps.
    """
    pos = s[s > 0]
    return linear_fit(pos.index.to_numpy(dtype=float), np.log(pos.to_numpy(dtype=float)))


def rolling_linear_slope(s: pd.Series, window: int, *, log: bool = False) -> pd.Series:
    """Least-squares slope (per step) over each trailing window of ``window`` points.

    Computed from rolling sums of x, y, xy, xx, so it costs O(n) whatever the window.
    With ``log=True`` the slope is of ``log(s)`` (non-positive values become NaN).
    """
    y = np.log(s.where(s > 0)) if log else s.astype(float)
    x = pd.Series(s.index.to_numpy(dtype=float), index=s.index)
    x = x - (x.iloc[0] if len(x) else 0.0)  # keep the sums well conditioned
    roll = {"min_periods": max(2, window // 2)}
    mx = x.rolling(window, **roll).mean()
    my = y.rolling(window, **roll).mean()
    mxy = (x * y).rolling(window, **roll).mean()
    mxx = (x * x).rolling(window, **roll).mean()
    var = mxx - mx * mx
    return ((mxy - mx * my) / var.where(var > 0)).rename(s.name)


def relative_change(s: pd.Series, start: int | None = None, end: int | None = None) -> float:
    """``(s[end] - s[start]) / |s[start]|`` between the first values at/after the given steps."""
    if len(s) == 0:
        return math.nan
    a = s[s.index >= start] if start is not None else s
    b = s[s.index >= end] if end is not None else s.iloc[-1:]
    if len(a) == 0 or len(b) == 0 or a.iloc[0] == 0:
        return math.nan
    return float((b.iloc[0] - a.iloc[0]) / abs(a.iloc[0]))


def correlation(
    a: pd.Series, b: pd.Series, *, method: str = "spearman", max_points: int = 200_000
) -> float:
    """Correlation of two series on their common steps (NaN with fewer than 3).

    Beyond ``max_points`` common steps an evenly strided subsample is used (ranking a
    million points costs more than the estimate gains).
    """
    joined = pd.concat([a, b], axis=1, join="inner").dropna()
    if len(joined) < 3:
        return math.nan
    if len(joined) > max_points:
        joined = joined.iloc[:: -(-len(joined) // max_points)]
    x, y = joined.iloc[:, 0], joined.iloc[:, 1]
    if x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    if method == "spearman":  # rank then Pearson: no scipy needed
        x, y = x.rank(), y.rank()
    elif method != "pearson":
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    return float(np.corrcoef(x.to_numpy(), y.to_numpy())[0, 1])


# ------------------------------------------------------------------------ change points
@dataclass(frozen=True)
class ChangePoint:
    """A shift in the mean: the segment starting at ``step`` has mean ``after``."""

    step: int
    before: float
    after: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _best_split(y: np.ndarray, min_size: int) -> tuple[int, float]:
    """Index k (split into y[:k], y[k:]) maximising the drop in squared error, and the drop."""
    n = len(y)
    if n < 2 * min_size:
        return -1, 0.0
    c = np.cumsum(y)
    total = c[-1]
    k = np.arange(min_size, n - min_size + 1)
    left = c[k - 1]
    # SSE(whole) - SSE(left) - SSE(right) = k(n-k)/n * (mean_left - mean_right)^2
    gain = left**2 / k + (total - left) ** 2 / (n - k) - total**2 / n
    i = int(np.argmax(gain))
    return int(k[i]), float(gain[i])


def change_points(
    s: pd.Series, *, max_points: int = 5, min_size: int | None = None, penalty: float = 8.0
) -> list[ChangePoint]:
    """Shifts in the mean by binary segmentation (vectorised cumulative sums per split).

    A split is kept when it reduces the squared error by more than
    ``penalty * sigma^2 * log(n)`` (a BIC-like cost), where sigma is a robust noise scale
    from the MAD of first differences, so the test does not depend on the series' units.

    Args:
        s: the series (use a smoothed or raw one; raw is fine: noise is accounted for).
        max_points: at most this many change points.
        min_size: the shortest segment, in points (default 5 % of the series, >= 3).
        penalty: larger -> fewer, surer change points.

    Returns:
        Change points sorted by step.
    """
    y = s.to_numpy(dtype=float)
    n = len(y)
    if n < 6:
        return []
    min_size = min_size or max(3, n // 20)
    diffs = np.diff(y)
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2.0)
    if not sigma > 0:
        sigma = float(np.std(y)) or 1.0
    threshold = penalty * sigma**2 * math.log(n)
    segments = [(0, n)]
    cuts: list[int] = []
    while len(cuts) < max_points:  # loop over segments (<= max_points + 1), not rows
        best = (0.0, -1, -1)
        for a, b in segments:
            k, gain = _best_split(y[a:b], min_size)
            if k > 0 and gain > best[0]:
                best = (gain, a, a + k)
        gain, _, cut = best
        if cut < 0 or gain <= threshold:
            break
        cuts.append(cut)
        segments = _segments(sorted(cuts), n)
    out = []
    bounds = [0, *sorted(cuts), n]
    for i, cut in enumerate(sorted(cuts)):
        out.append(
            ChangePoint(
                step=int(s.index[cut]),
                before=float(y[bounds[i] : cut].mean()),
                after=float(y[cut : bounds[i + 2]].mean()),
            )
        )
    return out


def _segments(cuts: list[int], n: int) -> list[tuple[int, int]]:
    bounds = [0, *cuts, n]
    return list(itertools.pairwise(bounds))


# ----------------------------------------------------------------------- plateau, runs
def plateau_start(s: pd.Series, *, rel_tol: float = 0.01, smooth: bool = True) -> int | None:
    """First step from which the (smoothed) series never again improves (drops) by more than
    ``rel_tol`` relative to its value at that step; None when it improves to the end.

    For a loss: the step at which learning stopped paying off.
    """
    if len(s) < 3:
        return None
    y = robust_smooth(s) if smooth else s
    # Best value reached strictly after each point (reverse cumulative min, shifted).
    future_min = y[::-1].cummin()[::-1].shift(-1)
    improves = (y - future_min) > rel_tol * y.abs()
    improves = improves.fillna(False).to_numpy(dtype=bool)
    idx = np.flatnonzero(improves)
    start = 0 if len(idx) == 0 else int(idx[-1]) + 1
    if start >= len(y) - 1:
        return None
    return int(y.index[start])


def sustained_from(mask: pd.Series) -> int | None:
    """The step from which ``mask`` is True through to the end of the series, or None."""
    if len(mask) == 0 or not bool(mask.iloc[-1]):
        return None
    arr = mask.to_numpy(dtype=bool)
    falses = np.flatnonzero(~arr)
    start = 0 if len(falses) == 0 else int(falses[-1]) + 1
    return int(mask.index[start])

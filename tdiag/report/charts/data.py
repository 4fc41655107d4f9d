"""Data preparation for the page's charts: shape-preserving downsampling, the debiased EMA
(the reference for the page's smoothing slider), series alignment and alternative x axes.

Downsampling keeps, per bucket of consecutive points, the point with the smallest and the
one with the largest value (plus the first and last point): a one-step spike in a
million-step run stays on the page at its true height and step, and the cost is a few
vectorised numpy passes (no per-bucket Python loop — LTTB is sequential by construction
and costs ~10 µs per bucket in Python, ~1 s for 50 series of a long run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tdiag.report.summary import logged_mask, numeric_column

__all__ = [
    "align_series",
    "bucket_envelope",
    "debiased_ema",
    "default_smoothing",
    "minmax_indices",
    "nonfinite_steps",
]

_MAX_NONFINITE_MARKS = 400


def minmax_indices(y: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ~``max_points`` points of ``y`` that keep its shape.

    ``y`` is cut into ``max_points // 2`` buckets of consecutive points; each keeps the
    index of its minimum and of its maximum (NaN ignored), and the first and last point are
    always kept. Short series are returned whole.

    Args:
        y: the values (float; NaN/Inf allowed — a bucket of only NaN keeps its first index).
        max_points: the budget, >= 4.

    Returns:
        Sorted unique int64 indices into ``y``.
    """
    n = len(y)
    if max_points < 4:
        raise ValueError(f"max_points must be >= 4, got {max_points!r}")
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    buckets = max_points // 2
    size = math.ceil(n / buckets)
    padded = np.full(buckets * size, np.nan)
    padded[:n] = np.where(np.isfinite(y), y, np.nan)
    grid = padded.reshape(buckets, size)
    empty = np.isnan(grid).all(axis=1)
    safe_lo = np.where(np.isnan(grid), np.inf, grid)
    safe_hi = np.where(np.isnan(grid), -np.inf, grid)
    base = np.arange(buckets, dtype=np.int64) * size
    lo = base + np.argmin(safe_lo, axis=1)
    hi = base + np.argmax(safe_hi, axis=1)
    lo[empty] = base[empty]
    hi[empty] = base[empty]
    idx = np.concatenate(([0, n - 1], lo, hi))
    return np.unique(idx[idx < n])


def bucket_envelope(
    x: np.ndarray, y: np.ndarray, buckets: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut finite ``y`` into ``buckets`` runs of consecutive points: (mean x, min, mean, max)
    of each. O(len(y)), vectorised."""
    n = len(y)
    size = max(1, math.ceil(n / buckets))
    starts = np.arange(0, n, size)
    counts = np.diff(np.append(starts, n))
    lo = np.minimum.reduceat(y, starts)
    hi = np.maximum.reduceat(y, starts)
    mean = np.add.reduceat(y, starts) / counts
    xc = np.add.reduceat(x.astype(np.float64), starts) / counts
    return xc, lo, mean, hi


def debiased_ema(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an EMA started at 0 and divided by ``1 - weight**k``.

    An EMA started at the first value lags behind a falling loss and sits above every raw
    point early in a run; the debiased form weighs the first points as a plain mean of what
    was seen so far, so it starts on the data. Non-finite values pass through unsmoothed and
    do not enter the average (as in TensorBoard). This is the reference the page's script
    (``charts.js``, ``ema``) is tested against.

    Args:
        values: the raw points, in step order.
        weight: 0 (no smoothing) to < 1.

    Returns:
        The smoothed values (float64, same length).
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be in [0, 1), got {weight!r}")
    y = np.asarray(values, dtype=np.float64)
    out = y.copy()
    last, k = 0.0, 0
    for i, v in enumerate(y.tolist()):
        if not math.isfinite(v):
            continue
        last = last * weight + (1.0 - weight) * v
        k += 1
        out[i] = last / (1.0 - weight**k)
    return out


def default_smoothing(points: int) -> float:
    """The slider's starting weight: an EMA spanning ~2 % of the drawn points (at least the
    0.6 TensorBoard starts at, at most 0.99), so a 2,000-point loss reads as a trend."""
    span = max(4.0, points / 50.0)
    return round(min(0.99, max(0.6, 1.0 - 2.0 / (span + 1.0))), 3)


def nonfinite_steps(df: pd.DataFrame, name: str, steps: np.ndarray) -> np.ndarray:
    """Steps where ``name`` was logged non-finite (see :func:`logged_mask`)."""
    col = numeric_column(df, name)
    if col is None:
        return np.empty(0, dtype=np.float64)
    return steps[logged_mask(df, name) & ~np.isfinite(col.to_numpy())]


def thin_marks(steps: np.ndarray) -> np.ndarray:
    """At most a few hundred non-finite marks, evenly picked (the first and last kept)."""
    if len(steps) <= _MAX_NONFINITE_MARKS:
        return steps
    return steps[np.unique(np.linspace(0, len(steps) - 1, _MAX_NONFINITE_MARKS).astype(int))]


def align_series(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], max_points: int
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """Downsample each (x, y) to its finite points' min/max envelope and put them on one
    shared, sorted x (what uPlot draws): NaN where a series has no point at that x.

    Returns:
        (x, aligned ys, finite point count of each series before downsampling).
    """
    picked_x, picked_y, totals = [], [], []
    for x, y in zip(xs, ys, strict=True):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        keep = np.isfinite(y) & np.isfinite(x)
        x, y = x[keep], y[keep]
        totals.append(len(y))
        idx = minmax_indices(y, max_points)
        picked_x.append(x[idx])
        picked_y.append(y[idx])
    if not picked_x:
        return np.empty(0), [], []
    ux = np.unique(np.concatenate(picked_x))
    aligned = []
    for x, y in zip(picked_x, picked_y, strict=True):
        row = np.full(len(ux), np.nan)
        row[np.searchsorted(ux, x)] = y
        aligned.append(row)
    return ux, aligned, totals


def map_axis(x: np.ndarray, ref_steps: np.ndarray, ref_values: np.ndarray) -> np.ndarray | None:
    """Another x axis (tokens, seconds) at the steps ``x``, interpolated from a reference
    column; None when the reference has fewer than two finite points."""
    ref_steps = np.asarray(ref_steps, dtype=np.float64)
    ref_values = np.asarray(ref_values, dtype=np.float64)
    keep = np.isfinite(ref_steps) & np.isfinite(ref_values)
    if keep.sum() < 2:
        return None
    order = np.argsort(ref_steps[keep], kind="stable")
    return np.interp(x, ref_steps[keep][order], ref_values[keep][order])


def history_axes(df: pd.DataFrame) -> Mapping[str, tuple[np.ndarray, np.ndarray]]:
    """The alternative x axes a run's history offers: cumulative ``train/tokens`` and
    wall-clock seconds since the first row (``time``)."""
    steps = df["step"].to_numpy(dtype=np.float64)
    axes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tokens = numeric_column(df, "train/tokens")
    if tokens is not None and np.isfinite(tokens.to_numpy()).sum() >= 2:
        axes["tokens"] = (steps, tokens.to_numpy(dtype=np.float64))
    time = numeric_column(df, "time")
    if time is not None:
        t = time.to_numpy(dtype=np.float64)
        finite = np.isfinite(t)
        if finite.sum() >= 2:
            axes["time"] = (steps, t - np.nanmin(np.where(finite, t, np.nan)))
    return axes

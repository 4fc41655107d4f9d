"""Sustained slow stretches of a throughput series (for ``perf.throughput-degradation``).

A stretch is a run of consecutive logged points whose smoothed throughput stays below a
fraction of the run's sustained peak, long enough and deep enough that noise cannot
explain it. Pure functions on pandas series; no Findings here.

Method (all in log throughput, so that "half as fast" is the same distance at any scale):

1. ``level`` = centered rolling median of ``window`` points (one slow batch or one fast
   one does not move it);
2. ``peak`` = the 90th percentile of ``level``: the throughput the run sustained at its
   best, robust to single fast points (a percentile of a median) and not pulled down when
   the slow stretch covers most of the run (a median of the run would be);
3. ``noise`` = 1.4826 * MAD of ``log(tp) - level`` (robust sigma of one point);
4. candidate points: ``level < log(peak * frac)``; candidates closer than ``window``
   points apart are merged into one stretch;
5. a stretch is kept when it holds at least ``min_points`` points, its median lies
   below the peak by more than ``z`` standard errors (``1.2533 * noise / sqrt(n)``, the
   standard error of a median), so that a short dip of a very noisy run is not a finding,
   and its median is below ``rest_frac`` times the 10th percentile of the rolling median
   over the rest of the run: slower than the run's own slow moments elsewhere, so that a
   run whose speed wanders (other jobs coming and going) is judged against its own
   variation. Other candidates as slow as the stretch (within that factor) are left out
   of its "rest": two throttled stretches are not each other's baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tdiag.report import analyses as an

__all__ = ["SlowStretch", "moved_with", "slow_stretches"]

# sqrt(pi / 2): the standard error of a sample median is this times sigma / sqrt(n).
_MEDIAN_SE = math.sqrt(math.pi / 2.0)


@dataclass(frozen=True)
class SlowStretch:
    """One slow stretch: the points ``[first, last]`` (steps, inclusive) of the series.

    Attributes:
        first, last: the first and last step of the stretch.
        points: logged points in it.
        median: median throughput in it.
        peak: the run's sustained peak throughput (see the module docstring).
        frac_of_peak: ``median / peak``.
        recovered: the series came back above the threshold after the stretch (a stretch
            that runs to the last point did not).
        time_lost_frac: the share of the run's wall time the stretch cost, taking each
            point's time as 1/throughput: ``sum(1/tp - 1/peak)`` over the stretch divided
            by ``sum(1/tp)`` over the series.
        z: how many standard errors the stretch's median lies below the peak.
    """

    first: int
    last: int
    points: int
    median: float
    peak: float
    frac_of_peak: float
    recovered: bool
    time_lost_frac: float
    z: float


def _runs(mask: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """[start, end] index pairs (inclusive) of the True runs of ``mask``, runs separated by
    fewer than ``gap`` False points merged."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > gap)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def slow_stretches(
    tp: pd.Series,
    *,
    frac: float,
    min_points: int,
    z: float,
    rest_frac: float = 0.5,
    rest_quantile: float = 0.1,
    window: int | None = None,
    peak_quantile: float = 0.9,
) -> list[SlowStretch]:
    """Sustained stretches of ``tp`` (throughput, higher is better) below ``frac`` of its
    sustained peak, in step order.

    Args:
        tp: throughput indexed by step (non-positive values are ignored).
        frac: a point is slow when its rolling median is below ``frac * peak``.
        min_points: the shortest stretch reported, in logged points.
        z: the stretch's median must lie this many standard errors below the peak.
        rest_frac, rest_quantile: the stretch's median must also be below ``rest_frac``
            times the ``rest_quantile`` quantile of the rolling median over the rest of the
            run: slower than the run ever was elsewhere, by that factor (a run whose speed
            wanders 3x on a shared machine is not flagged for a 3x dip).
        window: rolling-median window in points (default :func:`analyses.auto_window`,
            at least 5).
        peak_quantile: the quantile of the rolling median taken as the peak.

    Returns:
        The stretches (possibly empty). A series of fewer than ``2 * min_points`` points
        gives none.

    Raises:
        ValueError: ``frac`` not in (0, 1).
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac!r}")
    tp = tp[tp > 0]
    n = len(tp)
    if n < 2 * min_points:
        return []
    w = window or an.auto_window(n)
    y = pd.Series(np.log(tp.to_numpy(dtype=float)), index=tp.index)
    level = y.rolling(w, center=True, min_periods=w // 2 + 1).median()
    lv = level.to_numpy()
    log_peak = float(np.nanquantile(lv, peak_quantile))
    resid = (y - level).to_numpy()
    noise = an.MAD_TO_SIGMA * float(np.nanmedian(np.abs(resid - np.nanmedian(resid))))
    noise = max(noise, 1e-6)
    slow = lv < log_peak + math.log(frac)
    yv, steps = y.to_numpy(), tp.index.to_numpy()
    total_time = float(np.sum(np.exp(-yv)))
    # candidates: long enough, deep enough, beyond the noise
    cands = []
    for a, b in _runs(slow, gap=w):
        seg = yv[a : b + 1]
        k = len(seg)
        med = float(np.median(seg))
        zz = (log_peak - med) / (_MEDIAN_SE * noise / math.sqrt(k))
        if k >= min_points and zz >= z and med <= log_peak + math.log(frac):
            cands.append((a, b, med, zz))
    kept: list[tuple[int, int, float, float]] = []
    for a, b, med, zz in cands:
        # The rest of the run: not this stretch (nor the half window its median leaks
        # into), nor a candidate as slow as this one within the factor (two throttled
        # stretches are one phenomenon, not each other's baseline).
        rest = np.ones(n, dtype=bool)
        for a2, b2, med2, _ in cands:
            if (a2, b2) == (a, b) or med2 <= med - math.log(rest_frac):
                rest[max(0, a2 - w // 2) : b2 + w // 2 + 1] = False
        if int(rest.sum()) < min_points:
            continue  # no run left to compare with: the trend's business
        floor = float(np.nanquantile(lv[rest], rest_quantile))
        if med <= floor + math.log(rest_frac):
            kept.append((a, b, med, zz))
    out = []
    for a, b, med, zz in sorted(kept):
        seg = yv[a : b + 1]
        lost = float(np.sum(np.exp(-seg) - math.exp(-log_peak)))
        out.append(
            SlowStretch(
                first=int(steps[a]),
                last=int(steps[b]),
                points=len(seg),
                median=math.exp(med),
                peak=math.exp(log_peak),
                frac_of_peak=math.exp(med - log_peak),
                recovered=b < n - 1,
                time_lost_frac=max(0.0, lost / total_time) if total_time > 0 else 0.0,
                z=float(zz),
            )
        )
    return out


def moved_with(
    series: Mapping[str, pd.Series], first: int, last: int, *, exclude: tuple[int, int] = (0, -1)
) -> dict[str, dict[str, float]]:
    """What each companion metric did during ``[first, last]`` against the rest of the run.

    Args:
        series: metric name -> series indexed by step (e.g. cpu percent, data time).
        first, last: the stretch (steps, inclusive).
        exclude: a step range left out of the "outside" part (the warm-up), as
            ``(first, last)`` steps; ``last = -1`` means none.

    Returns:
        ``{name: {"inside": median, "outside": median, "ratio": inside / outside}}`` for
        each metric with at least 2 points inside and 2 outside (others are left out).
    """
    out = {}
    for name, s in series.items():
        if len(s) == 0:
            continue
        idx = s.index
        inside = s[(idx >= first) & (idx <= last)]
        rest = s[(idx < first) | (idx > last)]
        if exclude[1] >= exclude[0]:
            rest = rest[(rest.index < exclude[0]) | (rest.index > exclude[1])]
        if len(inside) < 2 or len(rest) < 2:
            continue
        a, b = float(inside.median()), float(rest.median())
        out[name] = {"inside": a, "outside": b, "ratio": a / b if b != 0 else math.nan}
    return out

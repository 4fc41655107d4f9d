"""The periodicity of a logged series: does it repeat with a fixed lag once its trend is gone?

``data.unshuffled`` stands on it: unshuffled data gives every batch the same place in every
epoch, so each batch's own loss offset comes back one epoch later. The trend is removed with a
moving average over exactly one period (classical seasonal decomposition), which cancels a
pattern of that period out of the trend; the correlation of the residual with itself one
period later is then near 1 for a repeating pattern and near 0 for shuffled batches.
Thresholds are named constants; each says why it has its value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tdiag.report.rules.registry import SkipRule

PERIOD_MIN_LAG = 2  # rows: a lag of 1 is the smoothness of any curve
PERIOD_MIN_PERIODS = 3  # the run must cover this many periods (the detrend eats one)
PERIOD_ACF = 0.6
"""Autocorrelation at the lag (judgement: ``data_unshuffled``, 40 steps per epoch, reads
0.96 logged every 1, 2 or 5 steps and 0.81 every 7; the same run shuffled at most 0.43;
every other fixture at most 0.47, a blow-up's residue)."""
PERIOD_ACF_CONFIG = 0.5
"""...at the lag the config's steps per epoch predicts (a lag given, not searched)."""
PERIOD_Z = 4.0
"""The correlation must also be 4 standard errors (1/sqrt(pairs)) above 0: lags up to a
third of the run are scanned, and a short run's chance peaks are large."""
PERIOD_FUNDAMENTAL = 0.85
"""Multiples of the period peak too: the shortest lag within 85 % of the best is the period."""
PERIOD_OUTLIER_Z = 3.5
"""Residuals beyond this robust z are left out of the correlation: a corrupted shard that
spikes the loss every N steps (``loss_spikes``) is train.loss-spikes, not data order."""
PERIOD_MIN_AMPLITUDE = 0.02
"""Nats: the pattern (the spread of the mean residual over the phases of the period) must be
at least this large to matter (judgement: ``data_unshuffled``'s is 0.25 nats, 8 % of its
loss; a wiggle of a few hundredths of a nat costs the run nothing worth a warning)."""
PERIOD_MAX_ROWS = 4000  # the last rows analysed: periods up to ~1333 logged rows
PERIOD_REGULAR_FRAC = 0.8  # share of row gaps equal to the median gap (log_every)
PERIOD_EPOCH_MULTIPLES = 4  # the period "matches" the config's epoch at 1-4 epochs


def moving_average(x: np.ndarray, lag: int) -> tuple[np.ndarray, int]:
    """Centered moving average over exactly one period (classical seasonal decomposition: a
    2 x lag average for an even lag), so a pattern of that period cancels out of the trend.
    Returns (average, offset): ``average[i]`` is centered on ``x[i + offset]``."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    if lag % 2:
        return (c[lag:] - c[:-lag]) / lag, lag // 2
    s = c[lag + 1 :] - c[: -(lag + 1)] - 0.5 * (x[: len(x) - lag] + x[lag:])
    return s / lag, lag // 2


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def lag_correlation(x: np.ndarray, lag: int) -> tuple[float, int, np.ndarray]:
    """(autocorrelation of the detrended ``x`` at ``lag``, pairs used, residual).

    The trend is the moving average over one period (:func:`moving_average`); residuals
    beyond :data:`PERIOD_OUTLIER_Z` robust sigmas (spikes) are left out of the pairs."""
    ma, off = moving_average(x, lag)
    res = x[off : off + len(ma)] - ma
    if len(res) <= lag + 2:
        return 0.0, 0, res
    med = float(np.median(res))
    mad = 1.4826 * float(np.median(np.abs(res - med)))
    ok = np.abs(res - med) <= PERIOD_OUTLIER_Z * mad if mad > 0 else np.ones(len(res), bool)
    keep = ok[:-lag] & ok[lag:]
    a, b = res[:-lag][keep], res[lag:][keep]
    if len(a) < 3:
        return 0.0, len(a), res
    return _corr(a, b), len(a), res


def _significant(acf: float, pairs: int, floor: float) -> bool:
    return acf >= floor and acf >= PERIOD_Z / math.sqrt(max(pairs, 1))


def amplitude(res: np.ndarray, lag: int) -> float:
    """Standard deviation of the mean residual at each phase of the period (nats)."""
    phase = np.arange(len(res)) % lag
    counts = np.bincount(phase, minlength=lag)
    means = np.bincount(phase, weights=res, minlength=lag) / np.maximum(counts, 1)
    return float(np.std(means))


def regular_rows(s: pd.Series) -> tuple[pd.Series, int]:
    """(the last :data:`PERIOD_MAX_ROWS` rows of ``s`` from its first regular one, the log
    interval in steps). A Monitor's first row (step 1) comes before the regular cadence.

    Raises:
        SkipRule: too few rows, or not logged at a regular interval.
    """
    s = s.iloc[-PERIOD_MAX_ROWS:]
    gaps = np.diff(s.index.to_numpy())
    if len(gaps) < 2:
        raise SkipRule("too few train/loss points")
    k = int(np.median(gaps))
    if k < 1 or float(np.mean(gaps == k)) < PERIOD_REGULAR_FRAC:
        raise SkipRule("train/loss not logged at a regular interval")
    return (s.iloc[1:] if gaps[0] != k else s), k


def find_period(x: np.ndarray, epoch_lag: int | None = None) -> dict[str, Any] | None:
    """The epoch-like period of ``x`` (rows), or None.

    ``epoch_lag``: the lag the config predicts; when its correlation passes
    :data:`PERIOD_ACF_CONFIG` it is taken. Else lags ``PERIOD_MIN_LAG .. n/PERIOD_MIN_PERIODS``
    are scanned; among the peaks of that curve (a lag beside the period correlates almost as
    well as the period when the pattern is smooth) that pass :data:`PERIOD_ACF`, the shortest
    within :data:`PERIOD_FUNDAMENTAL` of the best is the period."""
    n = len(x)
    max_lag = n // PERIOD_MIN_PERIODS
    if epoch_lag is not None and PERIOD_MIN_LAG <= epoch_lag <= max_lag:
        acf, pairs, res = lag_correlation(x, epoch_lag)
        if _significant(acf, pairs, PERIOD_ACF_CONFIG):
            return {"lag": epoch_lag, "acf": acf, "pairs": pairs, "residual": res}
    scanned = [(lag, *lag_correlation(x, lag)) for lag in range(PERIOD_MIN_LAG, max_lag + 1)]
    acfs = [t[1] for t in scanned]
    peaks = [
        t
        for i, t in enumerate(scanned)
        if (i == 0 or acfs[i] >= acfs[i - 1])
        and (i == len(acfs) - 1 or acfs[i] >= acfs[i + 1])
        and _significant(t[1], t[2], PERIOD_ACF)
    ]
    if not peaks:
        return None
    best = max(t[1] for t in peaks)
    lag, acf, pairs, res = min(
        (t for t in peaks if t[1] >= PERIOD_FUNDAMENTAL * best), key=lambda t: t[0]
    )
    return {"lag": lag, "acf": acf, "pairs": pairs, "residual": res}

"""Where two loss curves part: the first step at which their difference leaves the noise.

Used by ``tdiag compare`` (:mod:`tdiag.report.compare`): runs that share a prefix and then
differ separate just after it; two seeds of one config do not. Pure numpy/pandas.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["SEP_K", "SEP_REL", "SEP_RUN", "SEP_SPEED", "Separation", "loss_separation"]

# Loss curves "separate" where their smoothed difference exceeds BOTH
#   SEP_K standard errors of it (statistics: not the batches' noise), and
#   SEP_REL times the curves' per-point noise (practice: apart by more than half the raw
#   points' scatter; two seeds of one config differ systematically by less than that),
# for SEP_RUN consecutive compared points (or SEP_RUN_FRAC of them, if more) — not one
# unlucky stretch. Then ``step`` is the first of those points (see loss_separation).
SEP_K = 4.0
SEP_REL = 0.5
SEP_RUN = 5
SEP_RUN_FRAC = 0.03
SEP_MIN_POINTS = 10
# ... and beyond what learning SEP_SPEED faster or slower explains where the loss falls
# fast (a's curve with its x stretched by 1 +- SEP_SPEED): seeds differ early in speed.
SEP_SPEED = 0.15
_MEDIAN_SE = math.sqrt(math.pi / 2.0)


@dataclass(frozen=True)
class Separation:
    """Where two loss curves part (see the module constants for the test).

    Attributes:
        step: the first compared point of the first sustained separation (in ``axis``
            units: a step, or a token count), or None when the curves never separate.
        axis: "step" or "tokens".
        diff: the smoothed difference (b - a) there (None when no separation).
        threshold: the smallest difference that counted as a separation.
        noise_a, noise_b: each run's per-point noise (robust sigma around its smoothing).
        window: the smoothing window, in points; points: compared points.
        max_z: the largest |difference| / threshold seen (< 1: never beyond the noise).
        reason: why nothing could be compared (too few common points), else None.
    """

    step: float | None
    axis: str
    diff: float | None
    threshold: float | None
    noise_a: float | None
    noise_b: float | None
    window: int
    points: int
    max_z: float | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.step, float) and self.step.is_integer():
            d["step"] = int(self.step)
        return d


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    import pandas as pd

    return pd.Series(y).rolling(w, center=True, min_periods=1).median().to_numpy()


def _sigma_from_diffs(y: np.ndarray) -> float:
    """Robust per-point noise from first differences (a trend cancels; one spike makes two
    large differences, which the median ignores): ``1.4826 * MAD(dy) / sqrt(2)``."""
    from tdiag.report.analyses import MAD_TO_SIGMA

    dy = np.diff(y)
    if len(dy) == 0:
        return 0.0
    return float(MAD_TO_SIGMA * np.median(np.abs(dy - np.median(dy))) / math.sqrt(2.0))


def loss_separation(
    xa: np.ndarray,
    ya: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    *,
    axis: str = "step",
    k: float = SEP_K,
    rel: float = SEP_REL,
) -> Separation:
    """The first point where curve b leaves curve a beyond their noise.

    On a's points inside the range both cover, ``D = b - a`` (b linearly interpolated when
    its points differ) is smoothed by a centered rolling median of ``w`` points (``w``
    about 2 % of the points, 5 to 101). Its noise ``sigma_D`` is the robust sigma of its
    first differences, taken where it is not identically zero (runs that share a prefix
    differ by exactly 0 there; runs that share their batches have a quieter D than two
    independent curves). The smoothed D counts as a separation where
    ``|D_smooth| > max(k * 1.2533 * sigma_D / sqrt(w), rel * sigma)``, ``sigma`` the
    curves' own per-point noise (root mean square of theirs): beyond the statistics of the
    difference, and farther apart than a fraction of the raw points' scatter (long runs
    make the first term tiny; two seeds of one config differ systematically by less);
    and outside the band that a's loss (its running minimum after a wider smoothing)
    sweeps, relative to itself, when its x axis is stretched by ``1 +- SEP_SPEED``: where
    the loss falls fast, a run learning 15 % faster or slower is on the same curve.
    The answer is the first point of the first run of ``max(SEP_RUN, SEP_RUN_FRAC * n)``
    consecutive such points.

    Args:
        xa, ya, xb, yb: the curves (any order; NaN/Inf points are dropped).
        axis: the unit of x ("step" or "tokens"), carried into the result.
        k: standard errors of the smoothed difference.
        rel: multiples of the curves' per-point noise.
    """
    import pandas as pd

    xa, ya = _finite(xa, ya)
    xb, yb = _finite(xb, yb)
    w = _window(min(len(xa), len(xb)))
    empty = Separation(None, axis, None, None, None, None, w, 0, None)
    if min(len(xa), len(xb)) < SEP_MIN_POINTS:
        return _replace(empty, reason=f"fewer than {SEP_MIN_POINTS} loss points in a run")
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    inside = (xa >= lo) & (xa <= hi)
    if int(inside.sum()) < SEP_MIN_POINTS:
        return _replace(
            empty, reason=f"the runs share fewer than {SEP_MIN_POINTS} points of {axis}"
        )
    x = xa[inside]
    d = np.interp(x, xb, yb) - ya[inside]
    live = d != 0.0
    live[1:] |= live[:-1]  # keep the first difference out of an identical prefix
    sigma_d = _sigma_from_diffs(d[live]) if live.sum() >= 3 else 0.0
    noise_a, noise_b = _sigma_from_diffs(ya), _sigma_from_diffs(yb)
    sigma = math.sqrt((noise_a**2 + noise_b**2) / 2.0)
    threshold = max(k * _MEDIAN_SE * sigma_d / math.sqrt(w), rel * sigma, 1e-12)
    smooth = pd.Series(d).rolling(w, center=True, min_periods=1).median().to_numpy()
    # Where the loss falls fast, a run a little slower to learn (another seed) is far below
    # in nats while on the same curve: a difference within the band that a's curve sweeps
    # when its x axis is stretched by up to SEP_SPEED either way is not a separation. (The
    # band's shape: the running minimum of a wider smoothing, 3w, so that noise bumps and
    # a loss that rises widen nothing; only a falling loss makes a band.)
    shape = np.minimum.accumulate(_smooth(ya[inside], 3 * w))
    stretched = [np.interp(x * f, x, shape) - shape for f in (1.0 - SEP_SPEED, 1.0 + SEP_SPEED)]
    below = np.minimum.reduce([np.zeros(len(x)), *stretched]) - threshold
    above = np.maximum.reduce([np.zeros(len(x)), *stretched]) + threshold
    over = (smooth < below) | (smooth > above)
    first = _first_run(over, max(SEP_RUN, math.ceil(SEP_RUN_FRAC * len(x))))
    return Separation(
        step=float(x[first]) if first is not None else None,
        axis=axis,
        diff=float(smooth[first]) if first is not None else None,
        threshold=threshold,
        noise_a=noise_a,
        noise_b=noise_b,
        window=w,
        points=len(x),
        max_z=float(np.max(np.abs(smooth)) / threshold),
    )


def _replace(s: Separation, **kw: Any) -> Separation:
    return Separation(**{**asdict(s), **kw})


def _finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def _window(n: int) -> int:
    w = int(max(5, min(101, round(0.02 * n))))
    return w if w % 2 else w + 1


def _first_run(mask: np.ndarray, length: int) -> int | None:
    """The first index that starts ``length`` consecutive True values, or None."""
    if len(mask) < length:
        return None
    c = np.concatenate([[0], np.cumsum(mask.astype(np.int64))])
    full = np.flatnonzero(c[length:] - c[:-length] == length)
    return int(full[0]) if len(full) else None

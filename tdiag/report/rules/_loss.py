"""The training loss as the rules read it, shared by the loss and LR rule families: the
smoothed curve, divergence (above the best so far, or above the initial loss) and spikes.
Memoised within one ``evaluate`` call. Thresholds are named constants; each says why it has
its value.

"The initial loss" is the first logged training loss, unsmoothed: with the Monitor, the loss
of step 1, i.e. of the model as it was before any update. The smoothed curve is no stand-in
for it: a centered window reaches forward, so a loss that blows up in the first few logged
points starts the smoothed curve already high."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tdiag.report import analyses as an
from tdiag.report.rules._common import LOSS, memo, require

# Divergence: the smoothed loss climbs above its best-so-far by this much and stays there to
# the end. 0.3 nats is ~35 % more perplexity, far outside batch noise once smoothed; the
# relative term scales it for losses that are not in nats-of-a-big-vocabulary. Judgement.
DIVERGENCE_ABS = 0.3
DIVERGENCE_REL = 0.2
# ...for at least this many logged points (one bad window is a spike, not a divergence).
DIVERGENCE_MIN_POINTS = 3
# Spikes: robust z against the trailing median/MAD of this many points, and a relative
# floor so that a very smooth curve (tiny MAD) does not flag ordinary noise. Judgement,
# checked on healthy reference runs (no spike found).
SPIKE_WINDOW = 21
SPIKE_Z = 6.0
SPIKE_REL = 0.25
# One isolated spike is an info; this many, or one that doubles the loss, is a warning.
SPIKE_WARN_COUNT = 2
SPIKE_WARN_RATIO = 2.0
MIN_LOSS_POINTS = 10


def loss_smoothed(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(raw finite loss, robustly smoothed loss); SkipRule without enough points."""
    s = require(df, LOSS, min_points=MIN_LOSS_POINTS)
    return s, memo(df, "loss_smoothed", lambda: an.robust_smooth(s))


def divergence(sm: pd.Series) -> dict[str, Any] | None:
    """Where the smoothed loss left its best-so-far for good, or None."""
    best = sm.cummin()
    threshold = best + (DIVERGENCE_REL * best.abs()).clip(lower=DIVERGENCE_ABS)
    onset = an.sustained_from(sm > threshold)
    if onset is None:
        return None
    n_after = int((sm.index >= onset).sum())
    if n_after < DIVERGENCE_MIN_POINTS:
        return None
    # Report where the loss first left its best for this excursion: the first crossing after
    # the best value that precedes the sustained part (it may have dipped back briefly).
    before = sm[sm.index < onset]
    if len(before):
        best_at = before.idxmin()
        crossed = (sm > threshold)[(sm.index > best_at) & (sm.index <= onset)]
        onset = int(crossed.idxmax()) if crossed.any() else onset
    best_before = (
        float(best[best.index < onset].iloc[-1]) if onset > sm.index[0] else float(best.iloc[0])
    )
    best_step = int(sm[sm.index < onset].idxmin()) if onset > sm.index[0] else int(sm.index[0])
    return {
        "onset_step": int(onset),
        "best_loss": best_before,
        "best_step": best_step,
        "final_smoothed_loss": float(sm.iloc[-1]),
        "max_smoothed_loss": float(sm[sm.index >= onset].max()),
    }


def margin(level: float) -> float:
    """How far above ``level`` a loss must be to count as worse: max(0.3, 20 % of it)."""
    return max(DIVERGENCE_ABS, DIVERGENCE_REL * abs(level))


def above_initial(s: pd.Series, sm: pd.Series) -> dict[str, Any] | None:
    """Where the loss rose above its initial value for good, or None.

    A run whose smoothed loss ends above where it started by :func:`margin` made the model
    worse than its initialisation. After a blow-up in the first steps :func:`divergence`
    cannot see that: the smoothed curve starts high and its best comes after the blow-up.
    ``s`` is the raw loss, ``sm`` its smoothed curve. Fires when the smoothed loss is above
    the initial (raw, first logged) loss by :func:`margin` from some point to the end, for
    at least :data:`DIVERGENCE_MIN_POINTS` points; the onset is the first raw point above
    that line (the blow-up itself, not the lagging smoothed curve).
    """
    if len(s) == 0:
        return None
    initial = float(s.iloc[0])
    line = initial + margin(initial)
    sustained = an.sustained_from(sm > line)
    if sustained is None or int((sm.index >= sustained).sum()) < DIVERGENCE_MIN_POINTS:
        return None
    # the raw crossing that starts the stretch: the first after the last raw point at or
    # below the line up to where the smoothed loss stays above it
    below = s[(s <= line) & (s.index <= sustained)]
    crossed = s[(s > line) & (s.index > (below.index[-1] if len(below) else s.index[0] - 1))]
    onset = int(crossed.index[0]) if len(crossed) else int(sustained)
    return {
        "kind": "above_initial",
        "onset_step": onset,
        "initial_loss": initial,
        "initial_step": int(s.index[0]),
        "best_loss": initial,
        "best_step": int(s.index[0]),
        "final_smoothed_loss": float(sm.iloc[-1]),
        "max_smoothed_loss": float(sm[sm.index >= onset].max()),
        "max_loss": float(s[s.index >= onset].max()),
    }


def find_divergence(df: pd.DataFrame) -> dict[str, Any] | None:
    """The earlier of the two divergences: above the best so far (:func:`divergence`) or
    above the initial loss (:func:`above_initial`); None when neither (memoised)."""

    def compute() -> dict[str, Any] | None:
        s, sm = loss_smoothed(df)
        found = [d for d in (above_initial(s, sm), divergence(sm)) if d is not None]
        if not found:
            return None
        d = min(found, key=lambda x: (x["onset_step"], x.get("kind") != "above_initial"))
        d = {"kind": "above_best", **d}
        d["initial_loss"] = float(s.iloc[0])
        d["initial_step"] = int(s.index[0])
        return d

    return memo(df, "divergence", compute)


def loss_spikes(df: pd.DataFrame) -> pd.DataFrame:
    """Upward spikes of the training loss (see :func:`tdiag.report.analyses.spikes`)."""
    return memo(
        df,
        "loss_spikes",
        lambda: an.spikes(an.metric(df, LOSS), window=SPIKE_WINDOW, z=SPIKE_Z, rel=SPIKE_REL),
    )

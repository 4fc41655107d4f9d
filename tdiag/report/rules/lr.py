"""Rules on the learning rate: too high (instability, large update/weight ratio), too low
(slow learning, tiny updates, an LR of exactly 0). Thresholds are named constants; each says
why it has its value."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import LR, UPDATE_RATIO, clamp01, r, require, value_at
from tdiag.report.rules._loss import find_divergence, loss_smoothed, loss_spikes
from tdiag.report.rules.registry import SkipRule, register_rule

# A schedule "has warmup" when its first LR is below half its peak...
WARMUP_FRAC = 0.5
# ...and it reached that peak before the last 10 % of the run. An LR still rising at the end
# (warmup_steps longer than the run, a schedule built for another total) is no warmup: the
# peak is only where the run happened to stop, so "the LR was still small" excuses nothing.
WARMUP_ENDS_BY = 0.9
# Instability counts against the LR when it starts while the LR is at least this share of
# its peak (or when there is no warmup at all).
LR_HIGH_AT_ONSET = 0.5
# "Early rise": within the first EARLY_FRAC of the run the raw (unsmoothed) loss is this much
# above its initial value on at least EARLY_RISE_POINTS logged points, or once by
# EARLY_JUMP_REL: a too-large step throws the model uphill from the start. Raw, because the
# smoothed curve starts at a window's median that already holds the blow-up.
EARLY_FRAC = 0.3
EARLY_RISE_REL = 0.05
EARLY_RISE_POINTS = 2
EARLY_JUMP_REL = 0.25
# Update/weight ratio (||delta w|| / ||w|| per step): ~1e-3 is the usual healthy value for
# Adam (Karpathy, "Building makemore" part 3); two orders below means the weights barely
# move. Above 0.025 (25x the usual value) steps are too large: the tiny reference runs sit at
# 0.004-0.009 at LR 1e-3..3e-3 and at 0.016-0.019 at LR 1e-2..3e-2, at 0.03 at LR 0.1 (loss
# stuck 25 % above the healthy run's) and 0.05-0.09 at LR 0.3-1 (tests/report/fixtures).
# Judged on the median after the first 10 % of the run: the first Adam step moves every
# weight by the full LR (ratio lr / rms(w), 18 at LR 1.0).
UPDATE_RATIO_LOW = 1e-5
UPDATE_RATIO_HIGH = 0.025
# LR too low: over the whole run the smoothed loss improved by less than this fraction,
# while still going down at the end (it is learning, just slowly). Judgement.
LOW_LR_MAX_IMPROVEMENT = 0.1
LOW_LR_MIN_POINTS = 20
# LR exactly 0 on at least this share of the logged points (the first and the last are not
# counted: a warmup from 0 and a decay to 0 each touch 0 once): nothing trains there.
ZERO_LR_FRAC = 0.25
ZERO_LR_MIN_POINTS = 3


def _lr(df: pd.DataFrame) -> pd.Series:
    return require(df, LR, min_points=2)


def lr_shape(lr: pd.Series) -> dict[str, Any]:
    """The schedule as the rules read it: peak, warmup (only one that ended), still rising."""
    peak = float(lr.max())
    first, last = lr.index[0], lr.index[-1]
    peak_step = int(lr.index[int(np.argmax(lr.to_numpy() >= peak * (1 - 1e-9)))])
    starts_low = bool(lr.iloc[0] < WARMUP_FRAC * peak)
    rising_to_end = starts_low and bool(peak_step >= first + WARMUP_ENDS_BY * (last - first))
    has_warmup = starts_low and not rising_to_end
    rising = np.diff(lr.to_numpy()) > 0  # warmup: until the LR first stops increasing
    stop = int(np.argmin(rising)) if not rising.all() else len(rising)
    return {
        "peak": peak,
        "peak_step": peak_step,
        "has_warmup": has_warmup,
        "rising_whole_run": rising_to_end,
        "warmup_steps": int(lr.index[stop] - first) if has_warmup else 0,
    }


def early_rise(s: pd.Series) -> int | None:
    """First step at which the raw loss rose above its initial value early in the run
    (:data:`EARLY_RISE_REL` on :data:`EARLY_RISE_POINTS` points, or :data:`EARLY_JUMP_REL`
    once), or None."""
    if len(s) < 3:
        return None
    first, last = s.index[0], s.index[-1]
    early = s[(s.index > first) & (s.index <= first + EARLY_FRAC * (last - first))]
    base = float(s.iloc[0])
    risen = early[early > base + EARLY_RISE_REL * abs(base)]
    jumped = early[early > base + EARLY_JUMP_REL * abs(base)]
    if len(risen) >= EARLY_RISE_POINTS or len(jumped):
        return int(risen.index[0])
    return None


def steady_update_ratio(df: pd.DataFrame) -> tuple[pd.Series, float]:
    """``train/update_ratio`` and its median after the first 10 % of the run (NaN if absent)."""
    ur = an.metric(df, UPDATE_RATIO)
    return ur, float(an.steady_part(ur).median()) if len(ur) else math.nan


def _instability(df: pd.DataFrame, *, spikes: bool = True) -> dict[str, Any] | None:
    """The first sign of loss instability (divergence, early rise, and repeated spikes when
    ``spikes``: with a warmup, spikes alone are as likely bad batches as a too-high LR)."""
    s, _ = loss_smoothed(df)
    signs: list[tuple[int, str]] = []
    d = find_divergence(df)
    if d is not None:
        above = d["kind"] == "above_initial"
        signs.append((d["onset_step"], "divergence" + (" above the initial loss" if above else "")))
    sp = loss_spikes(df)
    if spikes and len(sp) >= 2:
        signs.append((int(sp.index[0]), f"{len(sp)} loss spikes"))
    rise = early_rise(s)
    if rise is not None:
        signs.append((rise, "loss rose above its initial value early in training"))
    if not signs:
        return None
    signs.sort()
    return {"onset_step": signs[0][0], "signs": [name for _, name in signs]}


@register_rule("train.lr-too-high", title="Learning rate too high")
def lr_too_high(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    lr = _lr(df)
    shape = lr_shape(lr)
    peak, has_warmup = shape["peak"], shape["has_warmup"]
    inst = _instability(df, spikes=not has_warmup)
    if (
        inst is not None
        and has_warmup
        and value_at(lr, inst["onset_step"]) < LR_HIGH_AT_ONSET * peak
    ):
        inst = None  # unstable while the warmup LR was still small: something else than the LR
    ur, ur_med = steady_update_ratio(df)
    big_steps = ur_med > UPDATE_RATIO_HIGH
    if inst is None and not big_steps:
        return []
    signs = list(inst["signs"]) if inst else []
    if big_steps:
        signs.append(f"update/weight ratio {ur_med:.2g} (usual ~1e-3)")
        steady = an.steady_part(ur)
        ur_onset = int(steady.index[int(np.argmax(steady.to_numpy() > UPDATE_RATIO_HIGH))])
    onset = inst["onset_step"] if inst else ur_onset
    lr_onset = value_at(lr, onset)
    s, sm = loss_smoothed(df)
    initial, final = float(s.iloc[0]), float(sm.iloc[-1])
    evidence = {
        "onset_step": onset,
        "lr_at_onset": r(lr_onset),
        "peak_lr": r(peak),
        "initial_lr": r(float(lr.iloc[0])),
        "warmup": has_warmup,
        "warmup_steps": shape["warmup_steps"],
        "lr_rising_whole_run": shape["rising_whole_run"],
        "signs": signs,
        "initial_loss": r(initial),
        "final_smoothed_loss": r(final),
        "final_over_initial": r(final / initial) if initial else math.nan,
        **_ratio_evidence(ur, ur_med),
        "lr_loss_spearman": r(an.correlation(lr, s)),
        "impact": clamp01(0.4 + 0.2 * len(signs) + (0.2 if not has_warmup else 0.0)),
    }
    return [
        Finding(
            id="train.lr-too-high",
            severity=Severity.WARNING,
            title="Learning rate too high" + _schedule_note(shape),
            message=_lr_high_message(inst, onset, lr_onset, shape, signs, initial, final),
            step=onset,
            evidence=evidence,
            recommendation=_lr_high_advice(shape, lr_onset),
        )
    ]


def _ratio_evidence(ur: pd.Series, ur_med: float) -> dict[str, float]:
    if not len(ur):
        return {}
    return {"update_ratio_median": r(ur_med), "update_ratio_threshold": UPDATE_RATIO_HIGH}


def _schedule_note(shape: dict[str, Any]) -> str:
    if shape["rising_whole_run"]:
        return " (LR still rising at the end)"
    return "" if shape["has_warmup"] else " (no warmup)"


def _lr_high_message(
    inst: dict[str, Any] | None,
    onset: int,
    lr_onset: float,
    shape: dict[str, Any],
    signs: list[str],
    initial: float,
    final: float,
) -> str:
    if shape["rising_whole_run"]:
        sched = (
            f"the LR rose for the whole run, to {shape['peak']:.3g} at step {shape['peak_step']}"
        )
    elif shape["has_warmup"]:
        sched = f"peak {shape['peak']:.3g}, warmup of ~{shape['warmup_steps']} steps"
    else:
        sched = f"peak {shape['peak']:.3g}, no warmup"
    loss = f"; the loss went from {initial:.4g} at the start to {final:.4g} (smoothed) at the end"
    if inst is not None:
        return (
            f"Training became unstable from step {onset} ({', '.join(signs)}) with the LR at "
            f"{lr_onset:.3g} ({sched}){loss}."
        )
    return (
        f"The steps are too large from step {onset}: {signs[-1]}, with the LR at {lr_onset:.3g} "
        f"({sched}); the weights move so far per step that the loss bounces instead of "
        f"descending{loss}."
    )


def _lr_high_advice(shape: dict[str, Any], lr_onset: float) -> str:
    if shape["rising_whole_run"]:
        return (
            "The warmup never ended: set warmup_steps to 1-5 % of the run (check that it is in "
            "optimizer steps, not samples or micro-batches), with a peak LR below the "
            f"{lr_onset:.2g} at which training became unstable (about {lr_onset / 3:.2g}); keep "
            "gradient clipping at max norm 1.0."
        )
    return (
        f"Lower the peak LR to about {shape['peak'] / 3:.2g} (3x lower) and "
        + (
            "lengthen the warmup"
            if shape["has_warmup"]
            else "add a linear warmup over the first 1-5 % of steps"
        )
        + "; keep gradient clipping at max norm 1.0. Run an LR range test to pick the peak; aim "
        "for an update/weight ratio near 1e-3."
    )


def zero_lr(lr: pd.Series) -> dict[str, Any] | None:
    """Logged points at which the LR was exactly 0 (see :data:`ZERO_LR_FRAC`), or None."""
    if len(lr) < ZERO_LR_MIN_POINTS:
        return None
    inner = lr.iloc[1:-1]
    zeros = inner[inner == 0.0]
    frac = len(zeros) / len(inner)
    if len(zeros) == 0 or frac < ZERO_LR_FRAC:
        return None
    # from the first zero after the start (a warmup from 0 is not the news)
    at_zero = lr[(lr == 0.0) & (lr.index >= zeros.index[0])]
    return {
        "zero_lr_frac": frac,
        "zero_lr_points": len(at_zero),
        "lr_points": len(lr),
        "first_zero_step": int(at_zero.index[0]),
        "step_range": [int(at_zero.index[0]), int(at_zero.index[-1])],
        "peak_lr": float(lr.max()),
    }


def _zero_lr_finding(z: dict[str, Any]) -> Finding:
    return Finding(
        id="train.lr-too-low",
        severity=Severity.WARNING,
        title="Learning rate is 0",
        message=(
            f"The LR was exactly 0 on {z['zero_lr_points']} of {z['lr_points']} logged points, "
            f"from step {z['step_range'][0]} to {z['step_range'][1]} (peak "
            f"{z['peak_lr']:.3g}): on those steps the optimizer does not move the weights, so "
            f"{z['zero_lr_frac']:.0%} of the run trained nothing."
        ),
        step=z["first_zero_step"],
        evidence={
            **{k: r(v) if isinstance(v, float) else v for k, v in z.items()},
            "signs": ["LR exactly 0"],
            "impact": clamp01(z["zero_lr_frac"]),
        },
        recommendation=(
            "Check the schedule: a decay that reaches min_lr = 0 long before the end "
            "(lr_decay_iters or total steps set far below the real number of steps, e.g. in "
            "epochs or thousands), a warmup or decay counted in the wrong unit, or an LR "
            "multiplier of 0 in the param groups. Keep a floor (min_lr about lr/10) and make "
            "the schedule's length the run's number of optimizer steps."
        ),
    )


@register_rule("train.lr-too-low", title="Learning rate too low")
def lr_too_low(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    lr = _lr(df)
    z = zero_lr(lr)
    if z is not None:  # named even on a run too short for the loss tests below
        return [_zero_lr_finding(z)]
    s, sm = loss_smoothed(df)
    if len(s) < LOW_LR_MIN_POINTS:
        raise SkipRule(f"only {len(s)} train/loss points, need {LOW_LR_MIN_POINTS}")
    improvement = float((sm.iloc[0] - sm.iloc[-1]) / abs(sm.iloc[0])) if sm.iloc[0] else math.nan
    half = s[s.index >= s.index[0] + 0.5 * (s.index[-1] - s.index[0])]
    late = an.log_linear_fit(an.robust_smooth(half))
    ur, ur_med = steady_update_ratio(df)
    slow = improvement < LOW_LR_MAX_IMPROVEMENT and late.slope < 0
    tiny_updates = ur_med < UPDATE_RATIO_LOW
    if not (slow or tiny_updates) or ur_med > UPDATE_RATIO_HIGH:
        return []  # (large steps that do not help: train.lr-too-high)
    if _instability(df) is not None:
        return []
    shape = lr_shape(lr)
    peak = shape["peak"]
    signs = []
    if slow:
        signs.append(f"loss improved only {improvement:.1%} and is still falling")
    if tiny_updates:
        signs.append(f"median update/weight ratio {ur_med:.2g}")
    if shape["rising_whole_run"]:
        signs.append("the LR was still rising at the end (warmup never ended)")
    evidence = {
        "loss_improvement_frac": r(improvement),
        "initial_smoothed_loss": r(float(sm.iloc[0])),
        "final_smoothed_loss": r(float(sm.iloc[-1])),
        "late_log_slope_per_1k_steps": r(late.slope * 1000),
        "peak_lr": r(peak),
        "lr_rising_whole_run": shape["rising_whole_run"],
        "signs": signs,
        "impact": clamp01(1.0 - max(improvement, 0.0) / LOW_LR_MAX_IMPROVEMENT * 0.5),
    }
    if len(ur):
        evidence["update_ratio_median"] = r(ur_med)
    rec = (
        f"Raise the peak LR (try {peak * 10:.2g}, 10x) or run an LR range test; for AdamW "
        "on small Transformers 3e-4 to 1e-3 is a usual start. Aim for an update/weight ratio "
        "near 1e-3."
    )
    if shape["rising_whole_run"]:
        rec = (
            "The warmup never ended, so the run never reached its peak LR: set warmup_steps "
            "to 1-5 % of the run (in optimizer steps). " + rec
        )
    return [
        Finding(
            id="train.lr-too-low",
            severity=Severity.WARNING,
            title="Learning rate too low",
            message=f"Learning is slow at peak LR {peak:.3g}: " + "; ".join(signs) + ".",
            step=int(s.index[-1]),
            evidence=evidence,
            recommendation=rec,
        )
    ]

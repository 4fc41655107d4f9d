"""Rules on the optimiser: learning rate too high or too low, growing gradient norm,
clipping on most steps. Thresholds are named constants; each says why it has its value."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import (
    CLIP_FRAC,
    GRAD_NORM,
    LR,
    UPDATE_RATIO,
    clamp01,
    loss_nonfinite_steps,
    meta_float,
    r,
    require,
    value_at,
)
from tdiag.report.rules.registry import SkipRule, register_rule
from tdiag.report.rules.training import divergence, loss_smoothed, loss_spikes

# A schedule "has warmup" when its first LR is below half its peak.
WARMUP_FRAC = 0.5
# Instability counts against the LR when it starts while the LR is at least this share of
# its peak (or when there is no warmup at all).
LR_HIGH_AT_ONSET = 0.5
# "Early rise": within the first EARLY_FRAC of the run the smoothed loss climbs this much
# above its starting value: a too-large step throws the model uphill from the start.
EARLY_FRAC = 0.3
EARLY_RISE_REL = 0.05
# Update/weight ratio (|lr * update| / |w| per step): ~1e-3 is the usual healthy value
# (Karpathy, "Building makemore" part 3); two orders below means the weights barely move.
UPDATE_RATIO_LOW = 1e-5
UPDATE_RATIO_HIGH = 1e-1
# LR too low: over the whole run the smoothed loss improved by less than this fraction,
# while still going down at the end (it is learning, just slowly). Judgement.
LOW_LR_MAX_IMPROVEMENT = 0.1
LOW_LR_MIN_POINTS = 20
# Gradient norm growth: after warm-up the smoothed norm ends this many times above its
# minimum, on a trend that explains most of the variance (log-linear R^2).
GRAD_GROWTH_FACTOR = 4.0
GRAD_GROWTH_R2 = 0.5
# Clipping on more than half the steps turns the optimiser into normalised-gradient
# descent: the LR schedule no longer sets the step size. Judgement.
CLIP_FRAC_WARN = 0.5
# ...and it is a warning when the median pre-clip norm is at least twice the threshold (every
# step is cut to half or less), or, with no norm logged, when nearly every step is clipped.
CLIP_RATIO_WARN = 2.0
CLIP_FRAC_ALWAYS = 0.9
# Early training has large gradients by nature: judge clipping after the first 20 %.
CLIP_SKIP = 0.2


def _lr(df: pd.DataFrame) -> pd.Series:
    return require(df, LR, min_points=2)


def _instability(df: pd.DataFrame, *, spikes: bool = True) -> dict[str, Any] | None:
    """The first sign of loss instability (divergence, early rise, and repeated spikes when
    ``spikes``: with a warmup, spikes alone are as likely bad batches as a too-high LR)."""
    _, sm = loss_smoothed(df)
    signs: list[tuple[int, str]] = []
    d = divergence(sm)
    if d is not None:
        signs.append((d["onset_step"], "divergence"))
    sp = loss_spikes(df)
    if spikes and len(sp) >= 2:
        signs.append((int(sp.index[0]), f"{len(sp)} loss spikes"))
    first, last = sm.index[0], sm.index[-1]
    early = sm[sm.index <= first + EARLY_FRAC * (last - first)]
    risen = early[early > sm.iloc[0] * (1 + EARLY_RISE_REL) + 1e-12]
    if len(early) >= 3 and len(risen):
        signs.append((int(risen.index[0]), "loss rose early in training"))
    if not signs:
        return None
    signs.sort()
    return {"onset_step": signs[0][0], "signs": [name for _, name in signs]}


@register_rule("train.lr-too-high", title="Learning rate too high")
def lr_too_high(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    lr = _lr(df)
    peak = float(lr.max())
    has_warmup = bool(lr.iloc[0] < WARMUP_FRAC * peak)
    inst = _instability(df, spikes=not has_warmup)
    ur = an.metric(df, UPDATE_RATIO)
    ur_med = float(ur.median()) if len(ur) else math.nan
    if inst is None and not (ur_med > UPDATE_RATIO_HIGH):
        return []
    onset = inst["onset_step"] if inst else int(ur.index[0])
    lr_onset = value_at(lr, onset)
    if inst is not None and has_warmup and lr_onset < LR_HIGH_AT_ONSET * peak:
        return []  # unstable while the LR was still small: something else than the LR
    signs = (inst["signs"] if inst else []) + (
        [f"update ratio {ur_med:.2g}"] if ur_med > UPDATE_RATIO_HIGH else []
    )
    # warmup: until the LR first stops increasing
    rising = np.diff(lr.to_numpy()) > 0
    stop = int(np.argmin(rising)) if not rising.all() else len(rising)
    warmup_steps = int(lr.index[stop] - lr.index[0]) if has_warmup else 0
    evidence = {
        "onset_step": onset,
        "lr_at_onset": r(lr_onset),
        "peak_lr": r(peak),
        "initial_lr": r(float(lr.iloc[0])),
        "warmup": has_warmup,
        "warmup_steps": warmup_steps,
        "signs": signs,
        "impact": clamp01(0.4 + 0.2 * len(signs) + (0.2 if not has_warmup else 0.0)),
    }
    if len(ur):
        evidence["update_ratio_median"] = r(ur_med)
    s = an.metric(df, "train/loss")
    evidence["lr_loss_spearman"] = r(an.correlation(lr, s))
    suggested = peak / 3
    return [
        Finding(
            id="train.lr-too-high",
            severity=Severity.WARNING,
            title="Learning rate too high" + ("" if has_warmup else " (no warmup)"),
            message=(
                f"Training became unstable from step {onset} ({', '.join(signs)}) with the LR at "
                f"{lr_onset:.3g} (peak {peak:.3g}, "
                + ("warmup of ~" + str(warmup_steps) + " steps" if has_warmup else "no warmup")
                + ")."
            ),
            step=onset,
            evidence=evidence,
            recommendation=(
                f"Lower the peak LR to about {suggested:.2g} (3x lower) and "
                + (
                    "lengthen the warmup"
                    if has_warmup
                    else "add a linear warmup over the first 1-5 % of steps"
                )
                + "; keep gradient clipping at max norm 1.0. Run an LR range test to pick the peak."
            ),
        )
    ]


@register_rule("train.lr-too-low", title="Learning rate too low")
def lr_too_low(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    lr = _lr(df)
    s, sm = loss_smoothed(df)
    if len(s) < LOW_LR_MIN_POINTS:
        raise SkipRule(f"only {len(s)} train/loss points, need {LOW_LR_MIN_POINTS}")
    improvement = float((sm.iloc[0] - sm.iloc[-1]) / abs(sm.iloc[0])) if sm.iloc[0] else math.nan
    half = s[s.index >= s.index[0] + 0.5 * (s.index[-1] - s.index[0])]
    late = an.log_linear_fit(an.robust_smooth(half))
    ur = an.metric(df, UPDATE_RATIO)
    ur_med = float(an.steady_part(ur).median()) if len(ur) else math.nan
    slow = improvement < LOW_LR_MAX_IMPROVEMENT and late.slope < 0
    tiny_updates = ur_med < UPDATE_RATIO_LOW
    if not (slow or tiny_updates) or _instability(df) is not None:
        return []
    peak = float(lr.max())
    signs = []
    if slow:
        signs.append(f"loss improved only {improvement:.1%} and is still falling")
    if tiny_updates:
        signs.append(f"median update/weight ratio {ur_med:.2g}")
    evidence = {
        "loss_improvement_frac": r(improvement),
        "initial_smoothed_loss": r(float(sm.iloc[0])),
        "final_smoothed_loss": r(float(sm.iloc[-1])),
        "late_log_slope_per_1k_steps": r(late.slope * 1000),
        "peak_lr": r(peak),
        "signs": signs,
        "impact": clamp01(1.0 - max(improvement, 0.0) / LOW_LR_MAX_IMPROVEMENT * 0.5),
    }
    if len(ur):
        evidence["update_ratio_median"] = r(ur_med)
    return [
        Finding(
            id="train.lr-too-low",
            severity=Severity.WARNING,
            title="Learning rate too low",
            message=f"Learning is slow at peak LR {peak:.3g}: " + "; ".join(signs) + ".",
            step=int(s.index[-1]),
            evidence=evidence,
            recommendation=(
                f"Raise the peak LR (try {peak * 10:.2g}, 10x) or run an LR range test; for AdamW "
                "on small Transformers 3e-4 to 1e-3 is a usual start. Aim for an update/weight ratio "
                "near 1e-3."
            ),
        )
    ]


@register_rule("train.grad-norm-growth", title="Gradient norm growing")
def grad_norm_growth(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    g = require(df, GRAD_NORM, min_points=20)
    steady = an.steady_part(g, 0.1)
    sm = an.robust_smooth(steady)
    low_step = int(sm.idxmin())
    low = float(sm.min())
    after = steady[steady.index >= low_step]
    if len(after) < 10 or low <= 0:
        return []
    growth = float(sm.iloc[-1] / low)
    fit = an.log_linear_fit(after)
    if not (growth >= GRAD_GROWTH_FACTOR and fit.slope > 0 and fit.r2 >= GRAD_GROWTH_R2):
        return []
    return [
        Finding(
            id="train.grad-norm-growth",
            severity=Severity.WARNING,
            title=f"Gradient norm grew {growth:.1f}x",
            message=(
                f"After its low of {low:.3g} at step {low_step} the smoothed gradient norm rose "
                f"steadily to {sm.iloc[-1]:.3g} (x{math.exp(fit.slope * 1000):.3g} per 1000 steps, "
                f"R^2 {fit.r2:.2f})."
            ),
            step=low_step,
            evidence={
                "low_step": low_step,
                "low": r(low),
                "final_smoothed": r(float(sm.iloc[-1])),
                "growth_factor": r(growth),
                "growth_per_1k_steps": r(math.exp(fit.slope * 1000)),
                "r2": r(fit.r2),
                "impact": clamp01(math.log(growth) / math.log(100)),
            },
            recommendation=(
                "A steadily growing gradient norm announces instability: lower the LR (or decay it), "
                "clip gradients (max norm 1.0), add weight decay, and check for growing attention "
                "logits (QK-norm) or an un-normalised residual stream (pre-norm)."
            ),
        )
    ]


def _clip_threshold(meta: dict[str, Any]) -> float | None:
    return meta_float(
        meta,
        "monitor.clip_used",
        "monitor.clip",
        "config.grad_clip",
        "config.max_grad_norm",
        "config.clip_grad_norm",
        "config.gradient_clip_val",
    )


@register_rule("train.clipping-frequent", title="Gradients clipped on most steps")
def clipping_frequent(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    clip = _clip_threshold(meta)
    bad = loss_nonfinite_steps(df)  # a NaN norm "clips" too
    g = an.metric(df, GRAD_NORM)
    g = an.steady_part(g[~g.index.isin(bad)], CLIP_SKIP)
    cf = an.metric(df, CLIP_FRAC)
    cf = cf[~cf.index.isin(bad)]
    if len(cf):
        frac_series = an.steady_part(cf, CLIP_SKIP)
        source = CLIP_FRAC
    elif len(g) and clip:
        frac_series = (g > clip).astype(float)
        source = f"{GRAD_NORM} > clip {clip:g}"
    else:
        raise SkipRule(
            f"no {CLIP_FRAC} in history, and no {GRAD_NORM} with a clip threshold in meta"
        )
    if len(frac_series) == 0:
        raise SkipRule("no finite clipping data after warm-up")
    frac = float(frac_series.mean())
    if frac <= CLIP_FRAC_WARN:
        return []
    ratio = float(g.median() / clip) if clip and len(g) else math.nan
    # Warning only when the clip cuts the typical step by >= 2x (or, without norms, on
    # nearly every step); a norm hovering just above the threshold is a mild, info-level cut.
    warn = ratio >= CLIP_RATIO_WARN if math.isfinite(ratio) else frac >= CLIP_FRAC_ALWAYS
    evidence: dict[str, Any] = {
        "clipped_frac": r(frac),
        "source": source,
        "step_range": [int(frac_series.index[0]), int(frac_series.index[-1])],
        "impact": clamp01(frac * (min(ratio, 10.0) / 10.0 if math.isfinite(ratio) else 0.5)),
    }
    rec = "Raise the clip threshold so that it only catches outliers"
    if clip:
        evidence["clip_threshold"] = clip
    if len(g):
        p90 = float(np.quantile(g.to_numpy(), 0.9))
        evidence["grad_norm_median"] = r(float(g.median()))
        evidence["grad_norm_p90"] = r(p90)
        evidence["median_norm_over_clip"] = r(ratio)
        rec += f" (about the 90th percentile of the gradient norm, {p90:.3g} here)"
    return [
        Finding(
            id="train.clipping-frequent",
            severity=Severity.WARNING if warn else Severity.INFO,
            title=f"Gradients clipped on {frac:.0%} of steps",
            message=(
                f"Gradient clipping was active on {frac:.0%} of steps after warm-up"
                + (
                    f" (threshold {clip:g}, median norm {g.median():.3g}: steps cut {ratio:.1f}x)"
                    if math.isfinite(ratio)
                    else ""
                )
                + ": the clip, not the LR schedule, sets the step size."
            ),
            step=int(frac_series.index[0]),
            evidence=evidence,
            recommendation=rec
            + "; if the norm is large because training is unstable, lower the LR instead.",
        )
    ]

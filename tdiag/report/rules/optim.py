"""Rules on the gradients: growing gradient norm, clipping on most steps. Thresholds are
named constants; each says why it has its value. (The learning-rate rules live in
:mod:`tdiag.report.rules.lr`.)"""

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
    clamp01,
    loss_nonfinite_steps,
    meta_float,
    r,
    require,
)
from tdiag.report.rules.registry import SkipRule, register_rule

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

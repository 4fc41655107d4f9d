"""Rules on the step count itself: optimizer steps skipped (``train/skipped_steps``).

The Monitor writes, on each training row, how many of the interval's steps had no
``optimizer.step()`` behind them: a ``GradScaler`` that found inf/NaN gradients, a loop that
skips updates, or ``mon.step()`` called once per micro-batch (an older Monitor counted each
call as a step; the current one recognises a fixed accumulation period). The interval of a
row is the steps since the previous training row. Thresholds are named constants; each says
why it has its value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report.rules._common import SKIPPED, clamp01, r, require, steps_list
from tdiag.report.rules.registry import register_rule

# A GradScaler starts at a scale of 2**16 and halves it on every overflow: the first steps
# of an fp16 run are skipped while it finds its scale (a dozen at most in practice). Skips
# within the first CALIBRATION_STEPS steps are not counted, up to CALIBRATION_STEPS of them.
CALIBRATION_STEPS = 32
# Past that, a healthy scaler skips about one step per growth_interval (2000 by default):
# 0.05 %. From 1 % (and at least SKIP_MIN_COUNT steps) the skips are news (info); from 10 %
# a tenth of the compute bought no update (warning). Judgement.
SKIP_INFO_FRAC = 0.01
SKIP_MIN_COUNT = 3
SKIP_WARN_FRAC = 0.1
# mon.step() per micro-batch skips exactly k-1 of every k calls: the cumulative count stays
# within one step of (k-1)/k of the steps at every row. A scaler's skips wander further.
MICRO_PERIOD_MAX = 64


def _intervals(steps: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Steps covered by each row: the gap to the previous row. The first row covers its own
    step number (steps count from 1), but no more than a typical gap (a resumed run's first
    row) unless it reports more skips than that (a first row written late, after the
    Monitor has watched several calls)."""
    gaps = np.diff(steps)
    typical = float(np.median(gaps)) if len(gaps) else 1.0
    first = min(max(float(steps[0]), 1.0), max(typical, float(counts[0]), 1.0))
    return np.concatenate([[first], gaps]).astype(float)


def micro_batch_period(skipped: np.ndarray, covered: np.ndarray) -> int | None:
    """k when the skips are exactly k-1 of every k steps all along (``mon.step()`` once per
    micro-batch of a k-step accumulation), else None."""
    frac = float(skipped.sum() / covered.sum())
    if not 0 < frac < 1:
        return None
    k = round(1.0 / (1.0 - frac))
    if not 2 <= k <= MICRO_PERIOD_MAX:
        return None
    drift = np.cumsum(skipped) - (k - 1) / k * np.cumsum(covered)
    return k if float(np.abs(drift).max()) <= 1.0 + 1e-9 else None


@register_rule("train.skipped-steps", title="Optimizer steps skipped")
def skipped_steps(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    sk = require(df, SKIPPED, min_points=2)
    steps = sk.index.to_numpy(dtype=float)
    covered = _intervals(steps, sk.to_numpy(dtype=float))
    counts = np.clip(sk.to_numpy(dtype=float), 0.0, covered)
    total, skipped = float(covered.sum()), float(counts.sum())
    early = float(counts[steps <= CALIBRATION_STEPS].sum())
    calibration = min(early, float(CALIBRATION_STEPS))
    counted = skipped - calibration
    frac = counted / total if total else 0.0
    if counted < SKIP_MIN_COUNT or frac < SKIP_INFO_FRAC:
        return []
    period = micro_batch_period(counts, covered)
    rows = sk.index[counts > 0]
    evidence: dict[str, Any] = {
        "skipped": round(skipped),
        "steps_counted": round(total),
        "skipped_frac": r(skipped / total),
        "calibration_skips": round(calibration),
        "skipped_frac_after_calibration": r(frac),
        "first_skip_step": int(rows[0]),
        "step_range": [int(sk.index[0]), int(sk.index[-1])],
        "steps": steps_list(rows),
        "micro_batch_period": period,
        "impact": clamp01(frac),
    }
    if period:
        optimizer_steps = round(total - skipped)
        message = (
            f"{skipped:.0f} of {total:.0f} logged steps ({skipped / total:.0%}) had no optimizer "
            f"step, exactly {period - 1} of every {period} from step {int(rows[0])} to "
            f"{int(sk.index[-1])}: the pattern of mon.step() called once per micro-batch with "
            f"{period} micro-batches per optimizer step. The run made ~{optimizer_steps} "
            f"optimizer steps, not {total:.0f}; step numbers and per-step rates in this report "
            f"are per micro-batch."
        )
    else:
        message = (
            f"The optimizer skipped {skipped:.0f} of {total:.0f} steps ({skipped / total:.0%}"
            + (f"; {calibration:.0f} in the first {CALIBRATION_STEPS} steps" if calibration else "")
            + f") between steps {int(rows[0])} and {int(sk.index[-1])}: those steps computed a "
            f"gradient and threw it away."
        )
    return [
        Finding(
            id="train.skipped-steps",
            severity=Severity.WARNING if frac >= SKIP_WARN_FRAC else Severity.INFO,
            title=f"{skipped / total:.0%} of optimizer steps skipped",
            message=message,
            step=int(rows[0]),
            evidence=evidence,
            recommendation=_advice(period),
        )
    ]


def _advice(period: int | None) -> str:
    if period:
        return (
            "Call mon.step() once per optimizer step, after optimizer.step(), with the step's "
            "loss (the mean over its micro-batches) and its tokens; or upgrade tdiag, whose "
            "Monitor recognises a fixed accumulation period and counts its calls as one step."
        )
    return (
        "A torch.amp.GradScaler skips a step when the scaled gradients overflow to inf/NaN; "
        "skipping this often means fp16 overflows on most steps. Use bf16 if the device has "
        "it; keep the scaler's defaults (growth_interval 2000, backoff_factor 0.5); find the "
        "layer that overflows (`tdiag check`, numerics.fp16-overflow-risk) and lower the LR or "
        "clip gradients. If the loop skips updates itself (say, on a loss spike), this is how "
        "many it threw away."
    )

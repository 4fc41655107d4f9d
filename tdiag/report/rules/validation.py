"""Rules on the validation loss: overfitting, early stopping.
Thresholds are named constants; each says why it has its value."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import LOSS, VAL_LOSS, clamp01, r, require, steps_list, value_at
from tdiag.report.rules.registry import register_rule

# Overfitting: the last validation loss is this much above its best (relative and
# absolute), on at least OVERFIT_MIN_WORSE evaluations after the best, while the training
# loss kept falling. 3 % / 0.02 nats is above eval noise on a fixed validation set.
OVERFIT_REL = 0.03
OVERFIT_ABS = 0.02
OVERFIT_MIN_WORSE = 2
# Early stopping: the best validation loss came this fraction of the run before its end.
# Neither rule points at the first evaluation: with an evaluation before training (nanoGPT
# evaluates at iteration 0) that is the untrained model.
EARLY_STOP_MIN_FRAC = 0.1


def _val(df: pd.DataFrame) -> pd.Series:
    return require(df, VAL_LOSS, min_points=3)


@register_rule("train.overfitting", title="Overfitting")
def train_overfitting(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    val = _val(df)
    train = an.robust_smooth(require(df, LOSS, min_points=3))
    best_step = int(val.idxmin())
    if best_step == int(val.index[0]):
        return []  # val never beat its first evaluation: it never generalised, so nothing to lose
    best = float(val.min())
    last = float(val.iloc[-1])
    after = val[val.index > best_step]
    worse = after[(after - best) > max(OVERFIT_ABS, OVERFIT_REL * abs(best))]
    if len(worse) < OVERFIT_MIN_WORSE or (last - best) <= max(OVERFIT_ABS, OVERFIT_REL * abs(best)):
        return []
    train_at_best = value_at(train, best_step)
    train_last = float(train.iloc[-1])
    if not train_last < train_at_best:
        return []  # val got worse but train did too: that is divergence, not overfitting
    gap_best = best - train_at_best
    gap_last = last - value_at(train, int(val.index[-1]))
    if not (gap_last > 0 and gap_last > gap_best):
        return []  # val at or below train, or a gap that did not grow: no memorisation
    evidence = {
        "best_val_step": best_step,
        "best_val_loss": r(best),
        "last_val_loss": r(last),
        "last_val_step": int(val.index[-1]),
        "train_loss_at_best": r(train_at_best),
        "train_loss_last": r(train_last),
        "gap_at_best": r(gap_best),
        "gap_last": r(gap_last),
        "steps": steps_list(worse.index),
        "impact": clamp01((last - best) / max(abs(best), 1e-9) * 2),
    }
    return [
        Finding(
            id="train.overfitting",
            severity=Severity.WARNING,
            title="Validation loss rising while training loss falls",
            message=(
                f"Validation loss was best at step {best_step} ({best:.4g}) and rose to {last:.4g}, "
                f"while the training loss kept falling ({train_at_best:.4g} -> {train_last:.4g}); "
                f"the generalisation gap grew from {gap_best:.3g} to {gap_last:.3g}."
            ),
            step=best_step,
            evidence=evidence,
            recommendation=(
                f"Keep the checkpoint of step {best_step} (early stopping). Then: more or more varied "
                "training data, more dropout or weight decay, a smaller model, or fewer epochs; "
                "check that validation data does not leak into training the other way round."
            ),
        )
    ]


@register_rule("train.early-stop", title="Early stopping point")
def train_early_stop(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    val = _val(df)
    best_step = int(val.idxmin())
    last_step = int(val.index[-1])
    if best_step in (last_step, int(val.index[0])):
        # At the end: nothing to stop. At the first evaluation (step 0 in a loop that evaluates
        # before training): the untrained model was the best, which is no stopping point but
        # a run that never learned (train.divergence / train.lr-too-high say why).
        return []
    span = max(1, int(last_step - val.index[0]))
    frac = (last_step - best_step) / span
    if frac < EARLY_STOP_MIN_FRAC:
        return []
    patience = int((val.index > best_step).sum())
    return [
        Finding(
            id="train.early-stop",
            severity=Severity.INFO,
            title=f"Could have stopped at step {best_step}",
            message=(
                f"The best validation loss ({val.min():.4g}) came at step {best_step}; the "
                f"{patience} evaluation(s) after it, up to step {last_step}, did not improve on it "
                f"({frac:.0%} of the evaluated run)."
            ),
            step=best_step,
            evidence={
                "best_val_step": best_step,
                "best_val_loss": r(float(val.min())),
                "last_val_step": last_step,
                "last_val_loss": r(float(val.iloc[-1])),
                "evals_without_improvement": patience,
                "wasted_frac": r(frac),
                "impact": clamp01(frac),
            },
            recommendation=(
                f"Use early stopping on val/loss (patience of about {max(2, patience // 2)} "
                f"evaluations) and keep the best checkpoint (step {best_step})."
            ),
        )
    ]

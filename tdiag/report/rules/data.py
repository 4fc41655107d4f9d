"""Rules on what the data does to the loss curve: the same batches in the same order every
epoch (``data.unshuffled``), and a training loss implausibly close to 0 (``data.label-leak``).
Thresholds are named constants; each says why it has its value (the fixtures named are real
runs in tests/report/fixtures/)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import LOSS, LR, VAL_LOSS, clamp01, meta_float, r, require
from tdiag.report.rules._loss import loss_smoothed
from tdiag.report.rules._period import (
    PERIOD_EPOCH_MULTIPLES,
    PERIOD_MAX_ROWS,
    PERIOD_MIN_AMPLITUDE,
    PERIOD_MIN_LAG,
    PERIOD_MIN_PERIODS,
    amplitude,
    find_period,
    lag_correlation,
    regular_rows,
)
from tdiag.report.rules.registry import register_rule

# ------------------------------------------------------------------ data.unshuffled
CYCLIC_LR_REL = 0.05
CYCLIC_LR_ACF = 0.5
"""An LR whose own residual (relative to its level) is over 5 % and correlates at the same
lag is a cyclic schedule (warm restarts): the loss repeats because the LR does."""
STEPS_PER_EPOCH_KEYS = (
    "config.steps_per_epoch",
    "config.batches_per_epoch",
    "config.iters_per_epoch",
    "config.num_update_steps_per_epoch",
    "config.epoch_steps",
    "steps_per_epoch",
)

# ------------------------------------------------------------------ data.label-leak
LEAK_LOSS = 0.05
"""Nats. No language model reaches that on text it has not memorised: the best byte-level
models sit near 0.7 nats per byte, subword models above 1.5 nats per token."""
LEAK_FRAC_LNV = 0.01
"""With the vocabulary size V known, the bar is max(0.05, 1 % of ln V, the loss of a
uniform guess)."""
LEAK_FAST_STEPS = 150
"""Reaching the bar within this many steps is fast (judgement, from real runs at LR 3e-3:
labels not shifted 75 steps (``label_leak``), one batch memorised 115
(``loop_repeated_batch``), an honest 2-batch corpus 235 (``overfit_tiny``))."""
LEAK_VAL_FLOOR = 0.3
LEAK_VAL_REL = 3.0
"""A validation loss at most max(0.3 nats, 3x the bar) after the bar is reached shows the
leak in held-out data too: memorisation never does that (``overfit_tiny``: val 5-6 nats)."""
LEAK_MIN_POINTS = 3  # smoothed points at or below the bar: one low window is noise
VOCAB_KEYS = (
    "config.vocab_size",
    "config.model.vocab_size",
    "config.model_config.vocab_size",
    "config.n_vocab",
    "model.vocab_size",
)


def _steps_per_epoch(meta: dict[str, Any]) -> int | None:
    e = meta_float(meta, *STEPS_PER_EPOCH_KEYS)
    return int(e) if e is not None and e >= 1 else None


def _cyclic_lr(df: pd.DataFrame, loss: pd.Series, lag: int) -> bool:
    """True when the LR itself repeats at this lag (a cyclic schedule, warm restarts)."""
    lr = an.metric(df, LR)
    if len(lr) < 3:
        return False
    lr = lr.reindex(loss.index, method="ffill").bfill().to_numpy(dtype=float)
    level = float(np.mean(np.abs(lr)))
    if not level > 0 or len(lr) < PERIOD_MIN_PERIODS * lag:
        return False
    acf, _, res = lag_correlation(lr, lag)
    return float(np.std(res)) / level > CYCLIC_LR_REL and acf >= CYCLIC_LR_ACF


@register_rule("data.unshuffled", title="Data not shuffled between epochs")
def data_unshuffled(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    loss = require(df, LOSS, min_points=PERIOD_MIN_PERIODS * PERIOD_MIN_LAG + 4)
    first = int(loss.index[-PERIOD_MAX_ROWS:][0])
    loss, k = regular_rows(loss)
    x = loss.to_numpy(dtype=float)
    epoch = _steps_per_epoch(meta)
    epoch_lag = epoch // k if epoch is not None and epoch % k == 0 else None
    found = find_period(x, epoch_lag)
    if found is None:
        return []
    lag = found["lag"]
    size = amplitude(found["residual"], lag)
    if size < PERIOD_MIN_AMPLITUDE or _cyclic_lr(df, loss, lag):
        return []  # too small to matter, or the loss repeats because the schedule does
    period = lag * k
    matches = None
    if epoch is not None:
        matches = any(abs(period - m * epoch) <= k for m in range(1, PERIOD_EPOCH_MULTIPLES + 1))
    periods = len(x) / lag
    boundaries = list(range(first + period, int(loss.index[-1]) + 1, period))[:20]
    acf = float(found["acf"])
    evidence = {
        "period_steps": period,
        "period_rows": lag,
        "log_interval_steps": k,
        "autocorrelation": r(acf),
        "periods_seen": r(periods, 3),
        "pairs": found["pairs"],
        "pattern_amplitude": r(size),
        "steps_per_epoch_config": epoch,
        "matches_config_epoch": matches,
        "steps": boundaries,
        "impact": clamp01(0.5 * acf),
    }
    said = ""
    if matches:
        said = f", the config's epoch length ({epoch} steps)"
    elif epoch is not None:
        said = f" (the config says {epoch} steps per epoch: another cycle in the data order)"
    return [
        Finding(
            id="data.unshuffled",
            severity=Severity.WARNING,
            title=f"The loss repeats every {period} steps: data in the same order every epoch",
            message=(
                f"With the trend removed, the training loss at step t and at t + {period}"
                f"{said} correlate at {acf:.2f} over {periods:.1f} periods (shuffled batches "
                f"give ~0): the same batches come in the same order each time, so each one's "
                f"loss comes back with it (pattern amplitude {evidence['pattern_amplitude']:.3g} "
                "nats)."
            ),
            step=boundaries[0] if boundaries else first,
            evidence=evidence,
            recommendation=(
                "Shuffle the training data every epoch: DataLoader(dataset, shuffle=True); with "
                "a DistributedSampler(shuffle=True) call sampler.set_epoch(epoch) at the start "
                "of each epoch (without it every epoch has the same order); a streaming or "
                "iterable dataset needs a shuffle buffer (e.g. datasets' "
                ".shuffle(buffer_size=...)) or pre-shuffled shards."
            ),
        )
    ]


# --------------------------------------------------------------------- the label leak
def _leak_bar(meta: dict[str, Any]) -> tuple[float, float | None, int | None]:
    """(the near-zero bar in nats, ln V, V) with V from meta when known."""
    v = meta_float(meta, *VOCAB_KEYS)
    if v is None or v < 2:
        return LEAK_LOSS, None, None
    ln_v = math.log(v)
    return max(LEAK_LOSS, LEAK_FRAC_LNV * ln_v), ln_v, int(v)


def _leak_evidence(
    df: pd.DataFrame, reached: int, steps_to: int, bar: float, epoch: int | None
) -> dict[str, Any]:
    """What says the loss saw its labels: the validation loss, the epoch, the speed."""
    val = an.metric(df, VAL_LOSS)
    after = val[val.index >= reached]
    val_level = float(after.median()) if len(after) else None
    val_max = max(LEAK_VAL_FLOOR, LEAK_VAL_REL * bar)
    signs: list[str] = []
    val_low = val_level is not None and val_level <= val_max
    val_high = val_level is not None and not val_low
    # In the first epoch every batch is new to the model, so its training loss is a held-out
    # loss. Unless the validation loss says otherwise: then the data repeated in a way the
    # config does not know (the same batch every step, an epoch length that is wrong).
    first_epoch = epoch is not None and steps_to <= epoch and not val_high
    if val_low:
        signs.append(f"the validation loss is near 0 too ({val_level:.3g} nats)")
    if first_epoch:
        signs.append(f"within the first epoch ({epoch} steps): on batches it had not seen")
    if steps_to <= LEAK_FAST_STEPS:
        signs.append(f"within {steps_to} steps (fast: <= {LEAK_FAST_STEPS})")
    return {
        "confirmed": val_low or first_epoch,
        "val_high": val_high,
        "val_loss_after": r(val_level) if val_level is not None else None,
        "val_points_after": len(after),
        "val_leak_max": r(val_max),
        "steps_per_epoch_config": epoch,
        "fast_steps": LEAK_FAST_STEPS,
        "signs": signs,
    }


@register_rule("data.label-leak", title="Training loss near 0: the model sees its labels")
def data_label_leak(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    s, sm = loss_smoothed(df)
    bar, ln_v, vocab = _leak_bar(meta)
    low = sm[sm <= bar]
    if len(low) < LEAK_MIN_POINTS:
        return []
    reached = int(low.index[0])
    if float(sm[sm.index >= reached].median()) > 2 * bar:
        return []  # touched the bar and left it: not a loss that sees its labels
    steps_to = reached - int(s.index[0]) + 1
    ev = _leak_evidence(df, reached, steps_to, bar, _steps_per_epoch(meta))
    confirmed, val_high = ev.pop("confirmed"), ev.pop("val_high")
    if not (confirmed or steps_to <= LEAK_FAST_STEPS):
        return []  # slow, and no held-out sign: memorisation of a tiny dataset looks like this
    level = float(sm.loc[reached])
    evidence = {
        "loss": r(level),
        "min_smoothed_loss": r(float(sm.min())),
        "initial_loss": r(float(s.iloc[0])),
        "threshold": r(bar),
        "ln_vocab": r(ln_v) if ln_v is not None else None,
        "vocab_size": vocab,
        "steps_to_near_zero": steps_to,
        **ev,
        "impact": 1.0 if confirmed else 0.8,
    }
    of_lnv = f" ({level / ln_v:.1%} of ln V = {ln_v:.3g})" if ln_v else ""
    tail = (
        f" The validation loss stayed high ({ev['val_loss_after']:.3g} nats): either only the "
        "training loss sees its labels, or the model memorised a handful of batches repeated "
        "over and over (data.repeated-batch)."
        if val_high
        else ""
    )
    return [
        Finding(
            id="data.label-leak",
            severity=Severity.ERROR if confirmed else Severity.WARNING,
            title=(
                "Training loss near 0: the model sees its labels"
                if confirmed
                else f"Training loss near 0 within {steps_to} steps: labels visible to the model?"
            ),
            message=(
                f"The smoothed training loss fell to {level:.3g} nats{of_lnv} at step {reached}, "
                f"{'; '.join(ev['signs'])}. A causal LM does not predict text that well "
                f"{'' if confirmed else 'that fast '}unless it sees its labels (not shifted, "
                f"or attention that sees ahead).{tail}"
            ),
            step=reached,
            evidence=evidence,
            recommendation=(
                "For a causal LM the label of position t is token t+1: compare logits[:, :-1] "
                "with input_ids[:, 1:] (Hugging Face models shift labels=input_ids themselves: "
                "give them unshifted labels, and never unshifted ones to a loss of your own). "
                "Check that the attention mask is causal and that the loss is computed from the "
                "logits; `tdiag check` runs data.label-leak and causal.leak on the model."
            ),
        )
    ]

"""Rules on the training loss curve: non-finite loss, divergence, spikes, plateau.
Thresholds are named constants; each says why it has its value (those shared with the LR
rules, and the reading of the loss curve, are in :mod:`tdiag.report.rules._loss`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tdiag.findings import Finding, Severity
from tdiag.report import analyses as an
from tdiag.report.rules._common import (
    LOSS,
    LR,
    clamp01,
    loss_nonfinite_steps,
    r,
    steps_list,
    value_at,
)
from tdiag.report.rules._loss import (
    SPIKE_WARN_COUNT,
    SPIKE_WARN_RATIO,
    find_divergence,
    loss_smoothed,
    loss_spikes,
    margin,
)
from tdiag.report.rules.registry import SkipRule, register_rule

# Plateau: "no improvement" means the smoothed loss never again drops by more than 1 %.
PLATEAU_REL_TOL = 0.01
# That test finds the last point that a later (noisy) low undercuts by 1 %, which in a loss
# that bounces at one level is late in the run. The plateau is dated from where the loss
# entered the band it then stayed in: the first step from which the smoothed loss never
# again rose above the plateau's own highest smoothed value plus this margin (twice the
# improvement tolerance: judgement, so that the band is wider than what counts as progress).
PLATEAU_BAND_TOL = 2 * PLATEAU_REL_TOL
# A plateau shorter than this fraction of the run is normal convergence noise.
PLATEAU_MIN_FRAC = 0.25
# Flat for half the run or more while the LR was not annealed: warning (time wasted).
PLATEAU_WARN_FRAC = 0.5
# LR "annealed" when it ended below this fraction of its peak: a late plateau is then
# convergence by design, reported as info only.
LR_ANNEALED_FRAC = 0.2


def _live_alert(events: Any, rule_id: str) -> dict[str, Any] | None:
    """The first live alert with this id in events.jsonl (dicts or Findings), or None."""
    for ev in events or ():
        d = ev.to_dict() if isinstance(ev, Finding) else ev
        if isinstance(d, dict) and d.get("id") == rule_id and d.get("step") is not None:
            return d
    return None


def _forensics_sentence(fx: Any) -> str:
    """The replay's answer (live alert's ``evidence.forensics``; docs/checks.md#forensics)."""
    if not isinstance(fx, dict) or fx.get("cause") is None:
        return ""
    if fx["cause"] == "transient":
        return " Forensics: the replay did not reproduce it (cause: transient)."
    op = f", op {fx['op']}" if fx.get("op") else ""
    return (
        f" Forensics: the replay first goes non-finite at step {fx.get('step')} in the "
        f"{fx.get('direction')} of {fx.get('module') or 'the loss function'}{op}; "
        f"cause: {fx['cause']}."
    )


@register_rule("train.nonfinite-loss", title="Loss became NaN/Inf", uses_events=True)
def nonfinite_loss(df: pd.DataFrame, meta: dict[str, Any], events: Any = ()) -> list[Finding]:
    if LOSS not in df.columns:
        raise SkipRule(f"no {LOSS} in history")
    bad = loss_nonfinite_steps(df)
    if len(bad) == 0:
        return []
    first_logged = int(bad[0])
    live = _live_alert(events, "train.nonfinite-loss")
    # The Monitor's live alert knows the exact step inside the log interval (the history
    # only has the interval's mean) and, with watch="layers", the first non-finite module.
    first = min(first_logged, int(live["step"])) if live else first_logged
    finite = an.metric(df, LOSS)
    before = finite[finite.index < first]
    n_logged = max(1, len(finite) + len(bad))
    evidence = {
        "first_step": first,
        "nonfinite_points": len(bad),
        "nonfinite_frac": r(len(bad) / n_logged),
        "last_finite_loss": r(float(before.iloc[-1])) if len(before) else None,
        "last_finite_step": int(before.index[-1]) if len(before) else None,
        "first_logged_step": first_logged,
        "steps": steps_list(bad),
        "impact": 1.0,
    }
    where = None
    forensics = None
    if live:
        evidence["live_alert_step"] = int(live["step"])
        where = live.get("where")
        forensics = (live.get("evidence") or {}).get("forensics")  # Monitor(forensics=True)
        if isinstance(forensics, dict):
            evidence["forensics"] = forensics
    if LR in df.columns:
        evidence["lr_at_first"] = r(value_at(an.metric(df, LR), first))
    return [
        Finding(
            id="train.nonfinite-loss",
            severity=Severity.ERROR,
            title="Training loss became NaN/Inf",
            where=where,
            message=(
                f"The loss was non-finite at {len(bad)} logged point(s) from step {first_logged}"
                + (
                    f"; the Monitor saw the first one at step {first}"
                    if first != first_logged
                    else ""
                )
                + (
                    f" (last finite logged value {before.iloc[-1]:.4g} at step {before.index[-1]})."
                    if len(before)
                    else "."
                )
                + (f" First non-finite module: {where}." if where else "")
                + _forensics_sentence(forensics)
            ),
            step=first,
            evidence=evidence,
            recommendation=(
                "Find the first non-finite tensor: rerun with the Monitor's flight recorder or "
                "`tdiag check` on the model. Usual causes: LR too high (lower it, add warmup), no "
                "gradient clipping (clip at 1.0), fp16 overflow (use bf16 or a GradScaler), "
                "log/sqrt/division of zero in a custom loss, or bad data (check inputs at that step)."
            ),
        )
    ]


@register_rule("train.divergence", title="Loss diverged")
def train_divergence(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    loss_smoothed(df)  # skips without enough points
    d = find_divergence(df)
    if d is None:
        return []
    rise = d["final_smoothed_loss"] - d["best_loss"]
    evidence = {
        **{k: r(v) if isinstance(v, float) else v for k, v in d.items()},
        "impact": clamp01(rise / max(abs(d["best_loss"]), 1e-9)),
    }
    if LR in df.columns:
        evidence["lr_at_onset"] = r(value_at(an.metric(df, LR), d["onset_step"]))
    if d["kind"] == "above_initial":
        message = (
            f"The loss rose above its initial value {d['initial_loss']:.4g} (step "
            f"{d['initial_step']}) from step {d['onset_step']} (up to {d['max_loss']:.4g}) and "
            f"never came back below it: the smoothed loss ended at "
            f"{d['final_smoothed_loss']:.4g}, so the trained model is worse than the untrained one."
        )
    else:
        message = (
            f"The smoothed loss left its best value {d['best_loss']:.4g} (step {d['best_step']}) "
            f"from step {d['onset_step']} and never came back: it ended at "
            f"{d['final_smoothed_loss']:.4g} (peak {d['max_smoothed_loss']:.4g})."
        )
    return [
        Finding(
            id="train.divergence",
            severity=Severity.ERROR,
            title="Training loss diverged",
            message=message,
            step=d["onset_step"],
            evidence=evidence,
            recommendation=(
                "Lower the peak learning rate (try 3x lower), add or lengthen warmup, clip gradients "
                "(max norm 1.0), and resume from a checkpoint saved before step "
                f"{d['onset_step']}. If it coincides with a data change, inspect those batches."
            ),
        )
    ]


def _live_spikes(events: Any) -> pd.DataFrame:
    """The Monitor's live ``train.loss-spikes`` (judged on per-step losses, which the logged
    interval means can hide), one row per episode indexed by its first step, with the
    columns of :func:`loss_spikes` and ``lo``/``hi``, the log interval that held it."""
    rows, index = [], []
    for ev in events or ():
        d = ev.to_dict() if isinstance(ev, Finding) else ev
        if not isinstance(d, dict) or d.get("id") != "train.loss-spikes" or d.get("step") is None:
            continue
        e = d.get("evidence") or {}
        try:
            lo, hi = (int(x) for x in e.get("interval", [d["step"], d["step"]]))
            row = {
                "value": float(e["peak_value"]),
                "baseline": float(e["baseline"]),
                "sigma": float(e.get("sigma", float("nan"))),
                "robust_z": float(e.get("robust_z", float("nan"))),
                "ratio": float(e["ratio"]) if e.get("ratio") is not None else float("nan"),
                "lo": lo,
                "hi": hi,
            }
        except (KeyError, TypeError, ValueError):  # an event from another version: skip it
            continue
        rows.append(row)
        index.append(int(d["step"]))
    return pd.DataFrame(rows, index=pd.Index(index, name="step"))


def _spike_forensics(events: Any, step: int) -> dict[str, Any] | None:
    """The replay's answer of the live spike episode holding ``step`` (forensics=True)."""
    for ev in events or ():
        d = ev.to_dict() if isinstance(ev, Finding) else ev
        if not isinstance(d, dict) or d.get("id") != "train.loss-spikes":
            continue
        e = d.get("evidence") or {}
        fx = e.get("forensics")
        if isinstance(fx, dict) and step in (e.get("steps") or [d.get("step")]):
            return fx
    return None


def _spike_forensics_sentence(fx: dict[str, Any] | None) -> str:
    if not fx or fx.get("cause") is None:
        return ""
    text = f" Forensics (replay of step {fx.get('step')}): cause {fx['cause']}"
    first = fx.get("moved_first")
    if isinstance(first, dict):
        names = {"attn_max_logit": "attention max logit", "log_z": "output log Z"}
        stat = names.get(first.get("statistic"), "gradient norm")
        ratio = first.get("ratio")
        times = f" ({ratio:.3g}x)" if isinstance(ratio, int | float) and ratio < 1e300 else ""
        text += f"; the first layer statistic to move: the {stat} of {first.get('layer')}{times}"
    return text + "."


@register_rule("train.loss-spikes", title="Loss spikes", uses_events=True)
def train_loss_spikes(df: pd.DataFrame, meta: dict[str, Any], events: Any = ()) -> list[Finding]:
    live = _live_spikes(events)
    try:
        loss_smoothed(df)  # skips without enough points
        sp = loss_spikes(df)
    except SkipRule:
        if live.empty:
            raise
        sp = live.iloc[0:0].drop(columns=["lo", "hi"])
    if not live.empty:
        # A logged point inside a live spike's interval is that spike (the live one has the
        # exact step and the per-step peak): keep the live one.
        spans = list(zip(live.lo, live.hi, strict=True))
        kept = sp[[not any(lo <= s <= hi for lo, hi in spans) for s in sp.index]]
        live_sp = live.drop(columns=["lo", "hi"])
        sp = (pd.concat([kept, live_sp]) if len(kept) else live_sp).sort_index()
        sp = sp[~sp.index.duplicated(keep="last")]
    if sp.empty:
        return []
    worst = sp["ratio"].idxmax()
    max_ratio = float(sp["ratio"].max())
    warn = len(sp) >= SPIKE_WARN_COUNT or max_ratio >= SPIKE_WARN_RATIO
    evidence = {
        "count": len(sp),
        "steps": steps_list(sp.index),
        "worst_step": int(worst),
        "worst_value": r(float(sp.loc[worst, "value"])),
        "worst_baseline": r(float(sp.loc[worst, "baseline"])),
        "max_ratio": r(max_ratio),
        "max_robust_z": r(float(sp["robust_z"].max())),
        "impact": clamp01(0.15 * len(sp) + 0.3 * (max_ratio - 1.0)),
        "live_count": len(live),
    }
    if LR in df.columns:
        evidence["lr_at_worst"] = r(value_at(an.metric(df, LR), int(worst)))
    fx = _spike_forensics(events, int(worst))  # Monitor(forensics=True)
    if fx is not None:
        evidence["forensics"] = fx
    return [
        Finding(
            id="train.loss-spikes",
            severity=Severity.WARNING if warn else Severity.INFO,
            title=f"{len(sp)} loss spike(s)",
            message=(
                f"The loss jumped above its recent median {len(sp)} time(s); the worst, at step "
                f"{int(worst)}, reached {sp.loc[worst, 'value']:.4g} against a median of "
                f"{sp.loc[worst, 'baseline']:.4g} ({max_ratio:.2f}x)."
                + _spike_forensics_sentence(fx)
            ),
            step=int(worst),
            evidence=evidence,
            recommendation=(
                "Spikes come from too high a learning rate for the current curvature or from "
                "outlier batches: lower the peak LR or lengthen warmup, clip gradients (max norm "
                "1.0), and look at the batches at the listed steps (very long, repeated or "
                "corrupted samples). For attention logit growth consider QK-norm or z-loss."
            ),
        )
    ]


def plateau_began(sm: pd.Series, flat_from: int) -> int:
    """Where the plateau found from ``flat_from`` began: the first step from which the
    smoothed loss stays at or below the plateau's highest value (+ :data:`PLATEAU_BAND_TOL`)."""
    top = float(sm[sm.index >= flat_from].max())
    top += PLATEAU_BAND_TOL * abs(top)
    above = sm[(sm.index < flat_from) & (sm > top)]
    if len(above) == 0:
        return int(sm.index[0])
    return int(sm.index[sm.index > above.index[-1]][0])


@register_rule("train.plateau", title="Loss plateau")
def train_plateau(df: pd.DataFrame, meta: dict[str, Any]) -> list[Finding]:
    s, sm = loss_smoothed(df)
    flat_from = an.plateau_start(sm, rel_tol=PLATEAU_REL_TOL, smooth=False)
    if flat_from is None:
        return []
    first, last = int(s.index[0]), int(s.index[-1])
    if (last - flat_from) / max(1, last - first) < PLATEAU_MIN_FRAC:
        return []
    start = plateau_began(sm, flat_from)
    level = float(value_at(sm, start))
    if float(sm.iloc[-1]) > level + margin(level):
        return []  # the loss got worse, not flat: that is train.divergence
    frac = (last - start) / max(1, last - first)
    annealed = False
    lr_info: dict[str, Any] = {}
    if LR in df.columns and len(an.metric(df, LR)):
        lr = an.metric(df, LR)
        annealed = bool(lr.iloc[-1] < LR_ANNEALED_FRAC * lr.max())
        lr_info = {
            "lr_at_start": r(value_at(lr, start)),
            "lr_final": r(float(lr.iloc[-1])),
            "lr_peak": r(float(lr.max())),
        }
    warn = frac >= PLATEAU_WARN_FRAC and not annealed
    evidence = {
        "start_step": start,
        "flat_from_step": flat_from,
        "plateau_frac": r(frac),
        "loss_at_start": r(level),
        "final_smoothed_loss": r(float(sm.iloc[-1])),
        "initial_smoothed_loss": r(float(sm.iloc[0])),
        "lr_annealed": annealed,
        **lr_info,
        "impact": clamp01(frac),
    }
    return [
        Finding(
            id="train.plateau",
            severity=Severity.WARNING if warn else Severity.INFO,
            title=f"Loss flat for the last {frac:.0%} of training",
            message=(
                f"The smoothed loss reached {level:.4g} at step {start} and stayed at that level "
                f"to the end (from step {flat_from} it never improved by more than "
                f"{PLATEAU_REL_TOL:.0%}): {frac:.0%} of the run bought no progress."
            ),
            step=start,
            evidence=evidence,
            recommendation=(
                "If the LR was annealed this is convergence: stop earlier or grow the model/data. "
                "Otherwise the optimiser is stuck: try a higher LR (or a schedule that decays it), "
                "check that gradients reach every layer (`tdiag check`), that the data is not "
                "repeating, and that clipping or a tiny update ratio is not freezing training."
            ),
        )
    ]

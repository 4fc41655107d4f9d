"""Report rules: turn a run's history into ranked Findings.

``evaluate(df, meta, events)`` runs every registered rule (one family per module:
``training``, ``validation``, ``lr``, ``optim``, ``steps``, ``data``, ``perf``, ``memory``,
``dist``), adds the loop findings the Monitor raised live (events.jsonl, :mod:`live`) and returns a :class:`RuleResult`
with the findings (worst first: severity, then ``evidence["impact"]``, a cause before the
symptom it explains (:mod:`tdiag.report.rules.explains`)), the analyses behind
them (small JSON-able numbers for report.json) and the rules skipped with their reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tdiag.findings import Finding
from tdiag.report import analyses as an
from tdiag.report.rules import (  # noqa: F401  (importing registers the rules)
    _loss,
    data,
    dist,
    lr,
    memory,
    optim,
    perf,
    steps,
    training,
    validation,
)
from tdiag.report.rules._common import (
    GRAD_NORM,
    LOSS,
    LR,
    RSS,
    STEP_TIME,
    TOKENS_PER_SEC,
    VAL_LOSS,
    memo_scope,
    r,
    steps_list,
)
from tdiag.report.rules.explains import EXPLAINS, Explains, apply_explains
from tdiag.report.rules.live import is_loop_finding, loop_findings
from tdiag.report.rules.registry import RULES, RuleSpec, SkipRule, register_rule

__all__ = [
    "EXPLAINS",
    "RULES",
    "Explains",
    "RuleResult",
    "RuleSpec",
    "SkipRule",
    "evaluate",
    "rank_findings",
    "register_rule",
]

logger = logging.getLogger(__name__)


@dataclass
class RuleResult:
    """What :func:`evaluate` returns.

    Attributes:
        findings: ranked Findings (severity, then the Monitor's loop findings, then impact,
            then step; within a severity a cause before the symptoms it explains, which carry
            ``evidence["explained_by"]``).
        analyses: JSON-able numbers behind them (per metric summaries, trends, spikes…).
        skipped: ``[{"id", "reason"}]`` for each rule that did not apply.
    """

    findings: list[Finding] = field(default_factory=list)
    analyses: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _impact(f: Finding) -> float:
    v = f.evidence.get("impact", 0.0) if isinstance(f.evidence, Mapping) else 0.0
    try:
        v = float(v)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def rank_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first: severity, then the loop findings the Monitor raised live (bugs seen in the
    act, :mod:`tdiag.report.rules.live`), then ``evidence["impact"]`` (high first), then step
    (early first); then, within one severity, a cause before the symptoms it explains
    (:func:`tdiag.report.rules.explains.apply_explains`: the symptoms get
    ``evidence["explained_by"]``)."""
    ranked = sorted(
        findings,
        key=lambda f: (
            f.severity.rank,
            not is_loop_finding(f.id),
            -_impact(f),
            f.step if f.step is not None else -1,
        ),
    )
    return apply_explains(ranked)


def evaluate(
    df: pd.DataFrame,
    meta: Mapping[str, Any] | None = None,
    events: Iterable[Any] | None = None,
    *,
    only: Iterable[str] | None = None,
) -> RuleResult:
    """Run the rules on a history.

    Args:
        df: the history (``tdiag.history.read_history``): a ``step`` column and one column per
            metric; sparse rows are fine.
        meta: the run's meta.json dict (config, environment); ``{}`` when absent.
        events: the live Findings of events.jsonl (dicts or Findings); ``train.nonfinite-loss``
            takes the exact step and module of the Monitor's live alert from them, and the
            loop findings among them (``loop.*``, ``data.repeated-batch``…) join the findings.
        only: run only these rule ids.

    Returns:
        A :class:`RuleResult`. A rule that raises an unexpected error is logged and listed in
        ``skipped`` with reason ``"internal error: …"``: one broken rule never loses the report.
    """
    meta = dict(meta or {})
    wanted = set(only) if only is not None else None
    result = RuleResult()
    if df is None or "step" not in getattr(df, "columns", ()) or len(df) == 0:
        for rule_id in RULES:
            if wanted is None or rule_id in wanted:
                result.skipped.append({"id": rule_id, "reason": "empty history"})
        return result
    with memo_scope():
        _run_rules(df, meta, list(events or ()), wanted, result)
    return result


def _run_rules(
    df: pd.DataFrame,
    meta: dict[str, Any],
    events: list[Any],
    wanted: set[str] | None,
    result: RuleResult,
) -> None:
    findings: list[Finding] = []
    for rule_id, spec in RULES.items():
        if wanted is not None and rule_id not in wanted:
            continue
        try:
            findings.extend(spec.fn(df, meta, events) if spec.uses_events else spec.fn(df, meta))
        except SkipRule as exc:
            result.skipped.append({"id": rule_id, "reason": str(exc)})
        except Exception as exc:  # a bug in one rule must not lose the whole report
            logger.exception("report rule %s failed", rule_id)
            result.skipped.append(
                {"id": rule_id, "reason": f"internal error: {type(exc).__name__}: {exc}"}
            )
    findings.extend(f for f in loop_findings(events) if wanted is None or f.id in wanted)
    result.findings = rank_findings(findings)
    try:
        result.analyses = summarize_analyses(df)
    except Exception as exc:  # analyses are extras: keep the findings
        logger.exception("report analyses failed")
        result.analyses = {"error": f"{type(exc).__name__}: {exc}"}


def _series_summary(s: pd.Series) -> dict[str, Any]:
    return {
        "points": len(s),
        "first_step": int(s.index[0]),
        "last_step": int(s.index[-1]),
        "first": r(float(s.iloc[0])),
        "last": r(float(s.iloc[-1])),
        "min": r(float(s.min())),
        "min_step": int(s.idxmin()),
        "max": r(float(s.max())),
        "median": r(float(s.median())),
    }


def _plateau_steps(sm: pd.Series) -> dict[str, int | None]:
    """Where the smoothed loss stopped improving by 1 % (``plateau_flat_from_step``) and where
    that flat stretch began (``plateau_start_step``), as ``train.plateau`` dates it."""
    flat_from = an.plateau_start(sm, rel_tol=training.PLATEAU_REL_TOL, smooth=False)
    began = training.plateau_began(sm, flat_from) if flat_from is not None else None
    return {"plateau_start_step": began, "plateau_flat_from_step": flat_from}


def summarize_analyses(df: pd.DataFrame) -> dict[str, Any]:
    """The analyses behind the rules, as small JSON-able numbers (no per-row arrays)."""
    out: dict[str, Any] = {}
    loss = an.metric(df, LOSS)
    if len(loss) >= 3:
        w = an.auto_window(len(loss))
        _, sm = (
            _loss.loss_smoothed(df)
            if len(loss) >= _loss.MIN_LOSS_POINTS
            else (loss, an.robust_smooth(loss))
        )
        half = loss[loss.index >= loss.index[0] + 0.5 * (loss.index[-1] - loss.index[0])]
        fit = an.log_linear_fit(half)
        sp = _loss.loss_spikes(df)
        out["loss"] = {
            **_series_summary(loss),
            "smoothing": {"method": "centered rolling median + EMA", "window_points": w},
            "final_smoothed": r(float(sm.iloc[-1])),
            "trend_second_half": {
                "log_slope_per_1k_steps": r(fit.slope * 1000),
                "r2": r(fit.r2),
            },
            "spike_steps": steps_list(sp.index, 50),
            "change_points": [
                c.to_dict() for c in an.change_points(sm.iloc[:: max(1, len(sm) // 5000)])
            ],
            **_plateau_steps(sm),
        }
        lr = an.metric(df, LR)
        if len(lr) >= 3:
            out["lr_loss_spearman"] = r(an.correlation(lr, loss))
    val = an.metric(df, VAL_LOSS)
    if len(val):
        out["val_loss"] = _series_summary(val)
    for key, name in (
        ("grad_norm", GRAD_NORM),
        ("tokens_per_sec", TOKENS_PER_SEC),
        ("step_time", STEP_TIME),
        ("rss_gb", RSS),
    ):
        s = an.metric(df, name)
        if len(s) >= 3:
            fit = an.linear_fit(s.index.to_numpy(dtype=float), s.to_numpy())
            out[key] = {
                **_series_summary(s),
                "trend_per_1k_steps": r(fit.slope * 1000),
                "trend_r2": r(fit.r2),
            }
    return out

"""Loop findings: the bugs in the training script that the Monitor caught live.

The Monitor's loop checks (tdiag/monitor/loopchecks.py; docs/checks.md, "Loop checks") watch
the loop itself — gradients never cleared, the same batch every step, the model left in
eval mode — and write their Findings to events.jsonl. No history can re-derive them, so the
report takes them as they are, with their evidence, into its findings (the other live alerts,
such as ``train.nonfinite-loss``, are re-derived by the rules and only listed apart). They
are causes: a loss that plateaus because half the parameters never update is explained by
``loop.params-not-updated``, not the other way round; :func:`tdiag.report.rules.rank_findings`
puts them first within their severity and :data:`tdiag.report.rules.explains.EXPLAINS` names
them in the symptoms they explain.

The report does not import the Monitor (imports flow monitor -> history -> report): the ids
are listed here, and a test checks the list against the Monitor's registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from tdiag.findings import Finding

__all__ = ["LOOP_FINDING_IDS", "LOOP_IMPACT", "is_loop_finding", "loop_findings"]

LOOP_FINDING_IDS = frozenset(
    {
        "loop.grad-accumulating",
        "loop.params-not-in-optimizer",
        "loop.params-not-updated",
        "loop.eval-mode-training",
        "loop.train-mode-eval",
        "loop.optimizer-replaced",
        "loop.clip-after-step",
        "data.repeated-batch",
        "data.pad-in-loss",
        "dist.weights-desync",
    }
)
"""The ids of the Monitor's loop checks (any ``loop.*`` id counts too, for newer Monitors)."""
LOOP_IMPACT = 1.0
"""A loop finding is a bug seen in the act, not a reading of a curve: full impact (unless the
Monitor gave one)."""
SOURCE = "events.jsonl"


def is_loop_finding(finding_id: str) -> bool:
    """True for the id of a loop check of the Monitor."""
    return finding_id in LOOP_FINDING_IDS or finding_id.startswith("loop.")


def _as_finding(event: Any) -> Finding | None:
    if isinstance(event, Finding):
        return event
    if not isinstance(event, dict):
        return None
    try:
        return Finding.from_dict(event)
    except (ValueError, TypeError):  # the report lists unreadable events as a problem
        return None


def loop_findings(events: Iterable[Any]) -> list[Finding]:
    """The loop findings among the live events (dicts or Findings), first of each id.

    Each keeps its message, ``where``, ``step`` and evidence; the evidence gains
    ``source: "events.jsonl"`` and an ``impact`` of :data:`LOOP_IMPACT` unless it has one.
    """
    out: list[Finding] = []
    seen: set[str] = set()
    for event in events:
        f = _as_finding(event)
        if f is None or not is_loop_finding(f.id) or f.id in seen:
            continue
        seen.add(f.id)
        evidence = {"impact": LOOP_IMPACT, **f.evidence, "source": SOURCE}
        out.append(dataclasses.replace(f, evidence=evidence))
    return out

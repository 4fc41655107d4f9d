"""The registry of report rules, keyed by their stable Finding id.

A rule is a pure function ``(df, meta) -> list[Finding]`` on the run's history (a pandas
DataFrame, Contract 3) and its meta.json dict; one registered with ``uses_events=True`` is
called ``(df, meta, events)`` with the live Findings of events.jsonl (dicts or Findings). A rule that does not apply (its metrics are
absent, too few points) raises :class:`SkipRule` with the reason, which the report lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tdiag.findings import Finding, TdiagError

__all__ = ["RULES", "RuleFn", "RuleSpec", "SkipRule", "register_rule"]

RuleFn = Callable[..., list[Finding]]


class SkipRule(TdiagError):
    """Raised by a rule that cannot run on this history; the message is the reason."""


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: its id, family (the id's prefix), one-line title and function."""

    id: str
    family: str
    title: str
    fn: RuleFn
    uses_events: bool = False


RULES: dict[str, RuleSpec] = {}


def register_rule(
    rule_id: str, *, title: str, uses_events: bool = False
) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` under ``rule_id``.

    Raises:
        ValueError: ``rule_id`` is already registered or is not dotted.
    """
    if "." not in rule_id or " " in rule_id:
        raise ValueError(f"rule id must be dotted like 'train.divergence', got {rule_id!r}")

    def deco(fn: RuleFn) -> RuleFn:
        if rule_id in RULES:
            raise ValueError(f"rule {rule_id!r} is already registered ({RULES[rule_id].fn!r})")
        RULES[rule_id] = RuleSpec(rule_id, rule_id.split(".", 1)[0], title, fn, uses_events)
        return fn

    return deco

"""The shared vocabulary: a Finding (what is wrong, where, the evidence, what to do).

The debugger, the Monitor's live alerts and the report's rules all emit Findings;
the CLI, the console, the JSON and the HTML only render them (Contract 2 in DESIGN.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Finding", "Severity", "TdiagError", "count_by_severity", "sort_findings", "to_jsonable"]


class TdiagError(Exception):
    """Base class of tdiag's domain errors."""


class Severity(str, Enum):
    """How bad a finding is. Ordered: ERROR > WARNING > INFO."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        """0 for error, 1 for warning, 2 for info: sorts the worst first."""
        return {"error": 0, "warning": 1, "info": 2}[self.value]


def _anchor(finding_id: str) -> str:
    return "docs/checks.md#" + finding_id.replace(".", "-")


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One diagnosis.

    Attributes:
        id: stable dotted identifier documented in docs/checks.md (an API: never renamed).
        severity: error | warning | info.
        title: one line a person reads first.
        message: what was seen, with the numbers.
        where: a module or parameter path from ``named_modules()``/``named_parameters()``, or None.
        step: the training step, or None outside training.
        evidence: the numbers behind it (JSON-serialisable; non-finite floats allowed).
        recommendation: what to do about it.
        docs: link to the documentation anchor (derived from ``id`` when omitted).
    """

    id: str
    severity: Severity
    title: str
    message: str = ""
    where: str | None = None
    step: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    recommendation: str = ""
    docs: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or " " in self.id:
            raise ValueError(f"Finding id must be a non-empty dotted string, got {self.id!r}")
        if not isinstance(self.severity, Severity):
            try:
                object.__setattr__(self, "severity", Severity(self.severity))
            except ValueError:
                raise ValueError(
                    f"severity must be one of error|warning|info, got {self.severity!r}"
                ) from None
        if not self.docs:
            object.__setattr__(self, "docs", _anchor(self.id))

    def to_dict(self) -> dict[str, Any]:
        """The Contract-2 JSON object (non-finite floats encoded as strings)."""
        return {
            "id": self.id,
            "severity": self.severity.value,
            "title": self.title,
            "message": self.message,
            "where": self.where,
            "step": self.step,
            "evidence": to_jsonable(self.evidence),
            "recommendation": self.recommendation,
            "docs": self.docs,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`. Raises ValueError on a missing id/severity/title."""
        missing = [k for k in ("id", "severity", "title") if k not in data]
        if missing:
            raise ValueError(f"not a Finding: missing {missing} in {dict(data)!r}")
        step = data.get("step")
        return cls(
            id=data["id"],
            severity=Severity(data["severity"]),
            title=data["title"],
            message=data.get("message", ""),
            where=data.get("where"),
            step=int(step) if step is not None else None,
            evidence=from_jsonable(dict(data.get("evidence") or {})),
            recommendation=data.get("recommendation", ""),
            docs=data.get("docs", ""),
        )


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_jsonable(value: Any) -> Any:
    """Make ``value`` strict-JSON safe: non-finite floats become "NaN"/"Infinity"/"-Infinity",
    tuples become lists, numpy/torch scalars become Python numbers."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy / 0-d torch scalars
    if callable(item):
        try:
            return to_jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, Enum):
        return to_jsonable(value.value)
    return str(value)


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`to_jsonable` for the non-finite float strings."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first: by severity, then by step (earliest first), stable otherwise."""
    return sorted(
        findings,
        key=lambda f: (f.severity.rank, f.step if f.step is not None else -1),
    )


def count_by_severity(findings: Iterable[Finding]) -> dict[str, int]:
    """``{"errors": n, "warnings": n, "infos": n}`` as in the JSON summaries."""
    counts = {"errors": 0, "warnings": 0, "infos": 0}
    for f in findings:
        counts[f.severity.value + "s"] += 1
    return counts

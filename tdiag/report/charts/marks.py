"""Finding marks: which chart a finding belongs to, the steps (or span) it points at, and the
numbered vertical lines drawn there; the clip threshold from the run config."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tdiag.findings import Finding, Severity
from tdiag.report.charts.model import Mark

__all__ = [
    "FINDING_CHARTS",
    "SEVERITY_COLORS",
    "chart_keys_for_finding",
    "clip_threshold",
    "finding_span",
    "finding_steps",
    "marks_by_chart",
]

SEVERITY_COLORS = {Severity.ERROR: "#c62828", Severity.WARNING: "#e65100", Severity.INFO: "#1565c0"}
_MAX_MARKS_PER_FINDING = 25

# Which chart a finding's id points at (first one drawn wins); unknown ids use the prefix.
FINDING_CHARTS: dict[str, tuple[str, ...]] = {
    "train.nonfinite-loss": ("loss",),
    "train.divergence": ("loss", "grad-norm"),
    "train.loss-spikes": ("loss",),
    "train.plateau": ("loss", "lr"),
    "train.lr-too-high": ("loss", "lr", "update-ratio"),
    "train.lr-too-low": ("loss", "lr"),
    "train.grad-norm-growth": ("grad-norm",),
    "train.clipping-frequent": ("grad-norm",),
    "train.overfitting": ("loss",),
    "train.early-stop": ("loss",),
    "train.skipped-steps": ("loss",),
    "perf.gpu-underutilized": ("utilization", "throughput"),
    "perf.data-stall": ("step-time", "throughput"),
    "perf.throughput-degradation": ("throughput", "step-time"),
    "perf.low-mfu": ("throughput",),
    "mem.near-capacity": ("memory",),
    "mem.leak": ("memory",),
    "dist.straggler": ("step-time",),
    "data.unshuffled": ("loss",),
    "data.label-leak": ("loss",),
    # the Monitor's loop findings (events.jsonl)
    "loop.grad-accumulating": ("grad-norm", "loss"),
    "loop.clip-after-step": ("grad-norm",),
    "loop.params-not-updated": ("loss", "update-ratio"),
    "loop.optimizer-replaced": ("loss",),
    "data.repeated-batch": ("loss",),
    "dist.weights-desync": ("loss",),
}
_PREFIX_CHARTS = {
    "train.": ("loss",),
    "loop.": ("loss",),
    "data.": ("loss",),
    "perf.": ("throughput", "step-time"),
    "mem.": ("memory",),
    "dist.": ("step-time",),
    "grad.": ("grad-norm",),
    "attn.": ("attn-entropy", "attn-max-logit"),
}
# Legend labels of the Contract-3 metrics (the chart header lists the raw names).
# Config keys that hold a gradient-clipping threshold (meta.json "config").
_CLIP_KEYS = ("grad_clip", "clip_grad_norm", "max_grad_norm", "grad_clip_norm", "clip_norm", "clip")


def clip_threshold(meta: Mapping[str, Any] | None) -> float | None:
    """The gradient-clipping threshold from meta.json's config, if one is recorded."""
    if not meta:
        return None
    for scope in (meta.get("config"), meta.get("train_config"), meta):
        if not isinstance(scope, Mapping):
            continue
        for key in _CLIP_KEYS:
            value = scope.get(key)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if is_number and math.isfinite(value) and value > 0:
                return float(value)
    return None


def finding_steps(finding: Finding) -> list[int]:
    """The steps a finding points at: ``step`` and ``evidence["steps"]`` (first few)."""
    steps: list[int] = []
    if finding.step is not None:
        steps.append(int(finding.step))
    extra = finding.evidence.get("steps") if isinstance(finding.evidence, Mapping) else None
    if isinstance(extra, list | tuple):
        for s in extra:
            if isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s):
                steps.append(int(s))
    seen: set[int] = set()
    out = [s for s in steps if not (s in seen or seen.add(s))]
    return out[:_MAX_MARKS_PER_FINDING]


def finding_span(finding: Finding) -> tuple[int, int] | None:
    """The span of steps a finding judged (``evidence["step_range"]``: [first, last]), or None.

    Rules that judge a stretch of the run (data stall, low utilisation, a leak …) give one;
    it is drawn as a shaded band rather than as two lines.
    """
    span = finding.evidence.get("step_range") if isinstance(finding.evidence, Mapping) else None
    if not isinstance(span, list | tuple) or len(span) != 2:
        return None
    a, b = span
    ok = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in span
    )
    return (int(min(a, b)), int(max(a, b))) if ok else None


def chart_keys_for_finding(finding: Finding, available: Iterable[str]) -> list[str]:
    """Chart keys a finding belongs to, best first, restricted to the charts drawn."""
    available = list(available)
    wanted: list[str] = list(FINDING_CHARTS.get(finding.id, ()))
    if not wanted:  # an id this version does not know: go by its family
        for prefix, keys in _PREFIX_CHARTS.items():
            if finding.id.startswith(prefix):
                wanted.extend(keys)
    out: list[str] = []
    for key in wanted:
        if key in available and key not in out:
            out.append(key)
    return out


# ---------------------------------------------------------------- drawing


def marks_by_chart(findings: Sequence[Finding], available: Sequence[str]) -> dict[str, list[Mark]]:
    """The marks of each chart key: findings numbered 1.. in order; a span as one band, a
    finding's own step labelled with its number and its other steps fainter."""
    marks: dict[str, list[Mark]] = {}
    for number, finding in enumerate(findings, start=1):
        keys = chart_keys_for_finding(finding, available)
        color = SEVERITY_COLORS.get(finding.severity, "#555555")
        span = finding_span(finding)
        if span is not None:
            found = [Mark(span[0], str(number), color, end=span[1])]
        else:
            found = [
                Mark(step, str(number), color, primary=i == 0)
                for i, step in enumerate(finding_steps(finding))
            ]
        for key in keys:
            marks.setdefault(key, []).extend(found)
    return marks


def marks_json(marks: Sequence[Mark]) -> list[dict[str, Any]]:
    """Marks as the spec's ``marks`` list."""
    return [
        {"step": m.step, "end": m.end, "label": m.label, "color": m.color, "primary": m.primary}
        for m in marks
    ]

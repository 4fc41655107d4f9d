"""A live Finding's forensics: the replay's answer in its evidence, message, ``where`` and
recommendation (per cause). The Finding keeps its id (``train.nonfinite-loss`` /
``train.nonfinite-grad``, docs/checks.md): forensics make it say more, not something else."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tdiag.findings import Finding
from tdiag.forensics.replay import ReplayResult

__all__ = ["describe", "recommendation_for", "with_forensics"]

_WHAT_TO_DO = {
    "data": (
        "The batch of step {step} alone breaks a healthy model: look at it (an empty or "
        "all-padding row, a token id out of range, an extreme or NaN input value, a label "
        "outside the vocabulary). Fix or filter it in the data pipeline; "
        "Monitor(on_nonfinite='skip') skips such a step's update meanwhile."
    ),
    "state": (
        "Only the updates before step {step} made it fail: the weights grew into overflow "
        "(evidence.forensics.grown lists those that grew most since the first kept snapshot). "
        "Lower the "
        "learning rate or add warmup, clip gradients (clip_grad_norm_ 1.0), add or fix a "
        "normalisation; with fp16 use bf16. Rolling back to the snapshot and skipping the "
        "batches (Monitor(on_nonfinite='rollback')) only defers it."
    ),
    "transient": (
        "The replay of the same batches from the same state did not go non-finite: "
        "nondeterminism (atomics, a data race, uninitialised memory) or a hardware fault. "
        "If it recurs on the same device, test the GPU (DCGM diagnostics, ECC errors in "
        "nvidia-smi -q); otherwise skipping the step (on_nonfinite='skip') is safe."
    ),
}


def recommendation_for(result: ReplayResult) -> str | None:
    """What to do, per cause (None when the replay gave no cause)."""
    text = _WHAT_TO_DO.get(result.cause or "")
    return None if text is None else text.format(step=result.step)


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def describe(result: ReplayResult) -> str:
    """One or two sentences for the Finding's message."""
    if result.cause is None:
        return f"Forensics: no replay ({result.reason})."
    if result.cause == "transient":
        return (
            "Forensics: replaying the kept steps from the snapshot of step "
            f"{result.evidence.get('snapshot_step')} did not reproduce it (transient)."
        )
    where = result.module or "code outside any submodule (the loss function)"
    what = "output" if result.direction == "forward" else "gradient"
    text = (
        f"Forensics: the replay first goes non-finite at step {result.step}, in the "
        f"{result.direction} of {where}"
        + (f" (op {result.op})" if result.op else "")
        + f"; cause: {result.cause}."
    )
    inp = result.stats.get("op_input") or result.stats.get("input")
    if isinstance(inp, dict):
        text += f" Its input had max |x| {_num(inp.get('abs_max'))}"
        if inp.get("zero_frac"):
            text += f" and {inp['zero_frac']:.0%} exact zeros"
        text += f"; the {what} went non-finite."
    return text


def with_forensics(finding: Finding, result: ReplayResult) -> Finding:
    """``finding`` with the replay's answer: ``evidence["forensics"]``, ``where`` (the module,
    when the finding had none or the replay named one), the message and the recommendation
    (per cause, before the generic one)."""
    evidence = {**finding.evidence, "forensics": result.to_evidence()}
    rec = recommendation_for(result)
    return dataclasses.replace(
        finding,
        where=result.module or finding.where,
        message=f"{finding.message} {describe(result)}",
        evidence=evidence,
        recommendation=f"{rec} {finding.recommendation or ''}".strip()
        if rec
        else finding.recommendation,
    )

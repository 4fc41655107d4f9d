"""Cause before symptom: which report findings explain which.

Some rules see the same trouble from two sides: ``train.lr-too-low`` (the cause) and
``train.plateau`` (its symptom) both fire on a run whose LR is too small, and the plateau's
generic advice ("try a higher LR, check gradients, check the data…") is worse than the
cause's ("raise the peak LR to …"). :data:`EXPLAINS` lists such pairs, each with the
condition under which the cause really accounts for the symptom (given how both rules are
written). :func:`apply_explains` then, on the ranked findings,

- writes ``evidence["explained_by"] = "<cause id>"`` into each explained symptom (the best-ranked
  cause when several apply), whatever the two severities;
- moves a cause ahead of its symptom when both have the same severity. A cause of lower
  severity than its symptom is not raised: severity always ranks first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tdiag.findings import Finding
from tdiag.report.rules._common import GPU_ALLOC

__all__ = ["EXPLAINS", "LOOP_EXPLAINS", "Explains", "apply_explains", "explaining_causes"]


@dataclass(frozen=True)
class Explains:
    """``cause`` explains ``symptom`` when both fired and ``applies(cause, symptom)`` holds.

    Attributes:
        cause: the Finding id of the cause.
        symptom: the Finding id of the symptom.
        why: one line for the docs: why (and when) the cause accounts for the symptom.
        applies: the condition on the two findings (default: always).
    """

    cause: str
    symptom: str
    why: str
    applies: Callable[[Finding, Finding], bool] = lambda cause, symptom: True


def _has_sign(word: str) -> Callable[[Finding, Finding], bool]:
    """True when the cause's ``evidence["signs"]`` names ``word`` (lr-too-high's instabilities)."""

    def check(cause: Finding, symptom: Finding) -> bool:
        return any(word in str(s) for s in cause.evidence.get("signs") or ())

    return check


def _not_before(cause: Finding, symptom: Finding) -> bool:
    """The symptom starts at or after the cause's step (a cause cannot explain the past)."""
    return cause.step is None or symptom.step is None or symptom.step >= cause.step


def _gpu_leak(cause: Finding, symptom: Finding) -> bool:
    """Only a leak of GPU memory fills the GPU (mem.leak also watches host RSS)."""
    return cause.evidence.get("metric") == GPU_ALLOC and _not_before(cause, symptom)


def _lr_not_zero(cause: Finding, symptom: Finding) -> bool:
    """Not the "Learning rate is 0" finding: that one is the cause of parameters not updated."""
    return "zero_lr_frac" not in symptom.evidence


def _lr_is_zero(cause: Finding, symptom: Finding) -> bool:
    """The "Learning rate is 0" finding (lr-too-low's zero-LR kind)."""
    return "zero_lr_frac" in cause.evidence


def _loop(cause: str, symptoms: tuple[str, ...], why: str, applies=None) -> tuple[Explains, ...]:
    """Pairs for a loop finding of the Monitor: a bug in the script seen in the act. Always
    (unless ``applies`` says otherwise): the bug is in the loop from the start, the Monitor
    names it at the first log step that shows it."""
    if applies is None:
        return tuple(Explains(cause, s, why) for s in symptoms)
    return tuple(Explains(cause, s, why, applies) for s in symptoms)


_PLATEAU_LIKE = ("train.plateau", "train.lr-too-low")
_UNSTABLE = ("train.divergence", "train.loss-spikes")

# The Monitor's loop findings (events.jsonl, tdiag.report.rules.live) as causes.
LOOP_EXPLAINS: tuple[Explains, ...] = (
    *_loop(
        "data.repeated-batch",
        ("train.overfitting", "train.early-stop", "train.plateau", "data.label-leak"),
        "the loop trains on one batch over and over: it memorises it (training loss near 0, "
        "validation loss rising) and learns nothing else",
    ),
    *_loop(
        "loop.grad-accumulating",
        (
            *_UNSTABLE,
            "train.lr-too-high",
            "train.grad-norm-growth",
            "train.clipping-frequent",
            "train.plateau",
        ),
        "every step applies the sum of all earlier gradients: the gradient norm grows, "
        "clipping bites on every step and the updates stop following the loss",
    ),
    *_loop(
        "loop.params-not-updated",
        _PLATEAU_LIKE,
        "parameters with gradients that the optimizer step leaves unchanged do not learn "
        "(not when the LR is exactly 0: then the LR finding is the cause)",
        _lr_not_zero,
    ),
    *_loop(
        "loop.params-not-in-optimizer",
        _PLATEAU_LIKE,
        "parameters outside every param group never update: the loss stalls",
    ),
    *_loop(
        "loop.eval-mode-training",
        (*_PLATEAU_LIKE, "train.overfitting"),
        "training in eval mode turns dropout off (overfitting) and freezes batch statistics "
        "(a loss that stalls)",
    ),
    *_loop(
        "loop.clip-after-step",
        (*_UNSTABLE, "train.clipping-frequent", "train.grad-norm-growth"),
        "the clip never reaches optimizer.step(): the steps are unclipped, and raising the "
        "threshold (the clipping rule's advice) changes nothing",
    ),
    *_loop(
        "loop.optimizer-replaced",
        (*_UNSTABLE, "train.plateau"),
        "a fresh optimizer loses Adam's moments and restarts its bias correction: the first "
        "steps after each replacement are large (spikes), the run makes little progress",
    ),
    *_loop(
        "dist.weights-desync",
        _UNSTABLE,
        "replicas that differ average gradients taken at different weights",
    ),
    Explains(
        "train.lr-too-low",
        "loop.params-not-updated",
        "an LR of exactly 0 leaves every parameter unchanged: the LR finding is the cause",
        _lr_is_zero,
    ),
)


EXPLAINS: tuple[Explains, ...] = (
    Explains(
        "train.lr-too-low",
        "train.plateau",
        "the loss barely moves because the steps are too small; the fix is a higher LR",
    ),
    Explains(
        "train.lr-too-high",
        "train.divergence",
        "the divergence is one of the instabilities the LR rule blamed on the LR "
        "(its evidence.signs lists it)",
        _has_sign("divergence"),
    ),
    Explains(
        "train.lr-too-high",
        "train.loss-spikes",
        "only when the LR rule counted the spikes as its sign (no warmup); with a warmup, "
        "spikes are as likely bad batches",
        _has_sign("loss spikes"),
    ),
    Explains(
        "train.lr-too-high",
        "train.plateau",
        "a plateau that starts at or after the LR-driven instability: the loss bounces "
        "instead of descending (the plateau's own advice, a higher LR, would be wrong)",
        _not_before,
    ),
    Explains(
        "train.lr-too-high",
        "train.clipping-frequent",
        "clipping that starts at or after the LR-driven instability: the norm is large because "
        "the steps are (raising the clip, the clipping rule's first advice, would make it worse)",
        _not_before,
    ),
    Explains(
        "train.nonfinite-loss",
        "train.divergence",
        "only a divergence from the first non-finite step on: the NaN/Inf update damaged the "
        "weights (a divergence before it is the run-up to the NaN, not its consequence)",
        _not_before,
    ),
    Explains(
        "train.nonfinite-loss",
        "train.loss-spikes",
        "only when the worst spike is at or after the first non-finite step",
        _not_before,
    ),
    Explains(
        "perf.data-stall",
        "perf.gpu-underutilized",
        "the accelerator is idle while it waits for batches",
    ),
    Explains(
        "perf.data-stall",
        "perf.low-mfu",
        "time spent waiting for data counts against the achieved FLOP/s",
    ),
    Explains(
        "perf.gpu-underutilized",
        "perf.low-mfu",
        "a GPU busy only part of the time cannot reach a high MFU",
    ),
    Explains(
        "mem.leak",
        "mem.near-capacity",
        "only a leak of sys/gpu_mem_allocated_gb (not host RSS) that starts before the peak",
        _gpu_leak,
    ),
    *LOOP_EXPLAINS,
)


def explaining_causes(
    symptom: Finding,
    findings: Sequence[Finding],
    explains: Sequence[Explains] = EXPLAINS,
) -> list[Finding]:
    """The findings among ``findings`` that explain ``symptom``, in the order given."""
    out = []
    for cause in findings:
        if cause is symptom:
            continue
        for rel in explains:
            if rel.cause == cause.id and rel.symptom == symptom.id and rel.applies(cause, symptom):
                out.append(cause)
                break
    return out


def apply_explains(
    ranked: Sequence[Finding], explains: Sequence[Explains] = EXPLAINS
) -> list[Finding]:
    """Annotate explained symptoms and put same-severity causes before their symptoms.

    Args:
        ranked: findings already ranked (severity, impact, step).
        explains: the pairs to apply (default :data:`EXPLAINS`).

    Returns:
        A new list: the order of ``ranked`` except that each cause of the same severity as a
        symptom it explains comes before it (recursively, so chains such as
        data-stall → gpu-underutilized → low-mfu hold); explained symptoms carry
        ``evidence["explained_by"]``.
    """
    ranked = list(ranked)
    causes = {i: explaining_causes(f, ranked, explains) for i, f in enumerate(ranked)}
    index = {id(f): i for i, f in enumerate(ranked)}
    annotated = [
        dataclasses.replace(f, evidence={**f.evidence, "explained_by": causes[i][0].id})
        if causes[i]
        else f
        for i, f in enumerate(ranked)
    ]
    out: list[Finding] = []
    placed: set[int] = set()
    visiting: set[int] = set()

    def place(i: int) -> None:
        if i in placed or i in visiting:  # visiting: a cycle in EXPLAINS; keep the rank order
            return
        visiting.add(i)
        for cause in causes[i]:
            if cause.severity == ranked[i].severity:
                place(index[id(cause)])
        visiting.discard(i)
        placed.add(i)
        out.append(annotated[i])

    for i in range(len(ranked)):
        place(i)
    return out

"""``data.label-leak``: can the training loss be driven down on tokens that carry no information?

Fresh uniformly random token ids are unpredictable: no model, however trained, can score a
cross-entropy below ln V on them (Gibbs' inequality; the uniform guess scores exactly ln V).
A setup whose labels can be read off its inputs can: labels not shifted for a causal LM (the
model is trained to repeat the token it is given), an ``(x, y)`` batch with ``y = x``, labels
shifted by hand the wrong way for a model that shifts them back, a masked LM that scores the
tokens it can see. So the check trains a copy of the model for a few dozen steps with the
file's own loss path (:meth:`CheckContext.loss`), each step on a new random batch built like
the file's (the same relation between labels and input ids, see :class:`FreshBatches`), and reads
the loss of each new batch before the step that trains on it: an out-of-sample loss, at no
extra forward.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdiag.debug.context import ModelOutputError
from tdiag.debug.fresh_batches import FreshBatches, cut_batch, label_relation
from tdiag.debug.probes import seeded, training_copy
from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

logger = logging.getLogger(__name__)

#: The probe batch: this many samples of at most PROBE_SEQ tokens (the full length when the
#: model rejects shorter sequences). 4 x 32 = 128 targets a step: one fresh batch's loss of a
#: correct model lies within 0.94-1.07 of ln V (measured), and a step is cheap.
PROBE_BATCH = 4
PROBE_SEQ = 32

#: Optimizer steps at most. Every leak of the test suite (tied and untied embeddings, HF
#: GPT-2, nanoGPT, a masked LM) crosses LEAK_FRAC within 17-28 steps at PROBE_LR (measured);
#: 40 leaves a margin.
MAX_STEPS = 40
#: Stop earlier once MIN_STEPS are done and the recent losses are conclusive (see _decided).
MIN_STEPS = 12
#: "Learning nothing" (see _decided): the recent mean is at least STALL_FRAC of the floor and
#: at least STALL_DROP of the mean MIN_STEPS // 2 steps earlier. Correct models sit at
#: 1.00-1.07 of ln V by then (measured), so they stop at 12-17 steps; 0.95 and 0.99 stopped
#: slow (partial) leaks before they showed.
STALL_FRAC = 1.0
STALL_DROP = 1.0
#: Wall-time cap: a large model stops after this long and is judged on the steps it made.
MAX_SECONDS = 5.0

#: Adam at a high learning rate, not the file's make_optimizer: the file's optimizer is tuned
#: for a long run (small lr, warmup) and this probe must see a leak within a few dozen steps;
#: whether the file's optimizer trains at all is train.cannot-overfit's question.
PROBE_LR = 1e-2

#: The judged value: the mean of the last WINDOW fresh-batch losses.
WINDOW = 3

#: Error when the fresh-token loss falls below LEAK_FRAC of the floor (see _floor: ln V for a
#: mean cross-entropy): more than half of the labels' information then comes from the inputs,
#: and a full leak goes on towards 0. A correct model cannot go below ln V but for sampling
#: noise: the judged means of 10 correct models x 6 seeds were 0.98-1.07 of ln V, single
#: batches >= 0.94 (measured), so any value well below 1 separates the two.
LEAK_FRAC = 0.5
#: Warning between LEAK_FRAC and PARTIAL_FRAC of the floor: part of the targets is
#: predictable. 0.8 is 0.14 below the lowest single batch of a correct model (0.94).
PARTIAL_FRAC = 0.8

#: A loss whose initial value divided by the number of targets is within this fraction of
#: ln V is taken as summed over the targets (the tolerance of loss.init-mismatch).
SUMMED_TOL = 0.25

#: A diagnosis is named when the trained copy's argmax equals the visible token at the same
#: position (labels not shifted) or the next one (the model sees the future) this often.
DIAGNOSIS_FRAC = 0.5

_SHAPE_ERRORS = (RuntimeError, ValueError, IndexError)


def _make_probe(ctx: CheckContext, template: dict[str, Any], source: str) -> FreshBatches:
    limit = ctx.token_limit()
    out_v = ctx.cache.get("logits_shape", (0, 0, limit))[-1]
    n_ids = min(v for v in (limit, out_v) if v)
    ids = template["input_ids"]
    rels = tuple(
        label_relation(k, ids, template[k]) for k in ("labels", "targets") if k in template
    )
    probe = FreshBatches(template, rels, n_ids, ctx.pad_id, not ctx.causal)
    if not probe.bidirectional:
        return probe
    if not rels and (source == "default" or ctx.targets_arg is not None):
        raise SkipCheck(
            "a bidirectional model without labels in the batch is scored by tdiag's made-up "
            "targets (its own inputs, or next tokens): there is no training objective of the "
            "file's to judge; give the file a loss_fn or labels"
        )
    judged = [r for r in rels if r.shift != 0 or bool(r.hidden.any())]  # host sync
    if rels and not judged:
        r = rels[0]
        frac = float(r.follows.sum() / (r.labels >= 0).sum().clamp_min(1))  # host sync
        raise SkipCheck(
            f"a bidirectional model sees every position, and the batch's {r.key} equal the "
            f"visible input at {frac:.0%} of the labelled positions with none hidden: there is "
            "no hidden target to judge (a masked LM must mask the inputs at the labelled "
            "positions, as DataCollatorForLanguageModeling does)"
        )
    return probe


def _start(
    ctx: CheckContext, model: nn.Module, source: str
) -> tuple[FreshBatches, dict[str, Any], torch.Tensor, Callable[[], dict[str, Any]]]:
    """The probe (PROBE_SEQ tokens, or the full length when the model rejects shorter
    sequences), its first fresh batch and that batch's loss, and the function drawing the
    next batches."""
    L = ctx.input_ids.shape[1]
    for seq in dict.fromkeys((min(PROBE_SEQ, L), L)):
        probe = _make_probe(ctx, cut_batch(ctx.batch, PROBE_BATCH, seq), source)
        gen = torch.Generator().manual_seed(ctx.seed + 1)

        def draw(p: FreshBatches = probe, g: torch.Generator = gen) -> dict[str, Any]:
            return p.batch(g, ctx.device)

        try:
            first = draw()
            return probe, first, ctx.loss(first, model=model), draw
        except _SHAPE_ERRORS as exc:
            if seq == L:
                raise
            logger.info("model rejects %d-token sequences (%s); using full length", seq, exc)
    raise AssertionError("unreachable: the full length is always tried")


@register_check("data.label-leak", family="data", title="Labels predictable from the inputs")
def check_label_leak(ctx: CheckContext) -> list[Finding]:
    """Train a copy on fresh random tokens; its loss on new ones must stay near ln V."""
    if ctx.cache.get("blocked"):
        raise SkipCheck(ctx.cache["blocked"])
    if ctx.token_limit() is None:
        raise SkipCheck("the vocabulary size is unknown (no nn.Embedding, no config.vocab_size)")
    source = ctx.loss_source()
    model = training_copy(ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SkipCheck("the model has no trainable parameter")
    opt = torch.optim.Adam(trainable, lr=PROBE_LR)
    losses: list[float] = []
    t0 = time.perf_counter()
    timed_out = False
    with seeded(ctx.seed), torch.enable_grad():
        probe, first, loss, draw = _start(ctx, model, source)
        ln_v = math.log(probe.n_choices)
        floor = ln_v
        for step in range(MAX_STEPS):
            if step:
                loss = ctx.loss(draw(), model=model)
            value = float(loss.detach())  # host sync: needed to stop early
            if step == 0:
                if not (math.isfinite(value) and value > 0):
                    raise SkipCheck(
                        f"the loss on random tokens is {value:.4g}, not a positive finite "
                        "cross-entropy (see numerics.nonfinite-forward)"
                    )
                floor = _floor(value, ln_v, probe.n_targets(first))
            if not math.isfinite(value):
                break  # diverged at PROBE_LR: judged on the finite steps
            losses.append(value)
            if not loss.requires_grad:
                raise SkipCheck("the loss has no gradient (see train.cannot-overfit)")
            timed_out = time.perf_counter() - t0 > MAX_SECONDS
            if _decided(losses, floor) or timed_out:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        diagnosis = _diagnose(ctx, model, draw())
    findings = _judge(ctx, probe, losses, ln_v, floor, diagnosis, source)
    if not findings and timed_out and len(losses) < MIN_STEPS:
        raise SkipCheck(
            f"inconclusive: only {len(losses)} training steps fitted in {MAX_SECONDS:g} s "
            "(a smaller config of the same model checks faster)"
        )
    return findings


def _floor(first: float, ln_v: float, n_targets: int) -> float:
    """What a loss that learns nothing stays at: ln V for a mean cross-entropy; the initial
    loss when that is lower (a loss scaled down, e.g. divided by the accumulation steps) or
    when it is about ``n_targets · ln V`` (a loss summed over the targets)."""
    if n_targets > 1 and abs(first / n_targets - ln_v) <= SUMMED_TOL * ln_v:
        return first
    return min(ln_v, first)


def _verdict(final: float, floor: float) -> Severity | None:
    """ERROR below LEAK_FRAC of the floor, WARNING below PARTIAL_FRAC, else None."""
    if final < LEAK_FRAC * floor:
        return Severity.ERROR
    return Severity.WARNING if final < PARTIAL_FRAC * floor else None


def _decided(losses: list[float], floor: float) -> bool:
    """Clearly leaking: the recent mean is below LEAK_FRAC of the floor. Or, after MIN_STEPS,
    clearly learning nothing: the recent mean is at or above the floor and did not fall over
    the last MIN_STEPS // 2 steps. A leak shows as a fall from the first steps: at PROBE_LR
    every leak of the test suite is below 0.9 of the floor by step 12; a 60 % noisy one (see
    the tests) below 0.97."""
    if len(losses) < WINDOW:
        return False
    recent = sum(losses[-WINDOW:]) / WINDOW
    if recent < LEAK_FRAC * floor:
        return True
    if len(losses) < MIN_STEPS:
        return False
    half = MIN_STEPS // 2
    earlier = sum(losses[-half - WINDOW : -half]) / WINDOW
    return recent >= STALL_FRAC * floor and recent >= STALL_DROP * earlier


def _diagnose(ctx: CheckContext, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """What the trained copy predicts on a fresh batch: the token it sees at the same position
    (``copies_input``) or the next one (``predicts_next``), as fractions of the positions."""
    try:
        with torch.no_grad():
            pred = ctx.forward(batch, model=model).argmax(-1).cpu()  # (b, l)
    except (ModelOutputError, *_SHAPE_ERRORS) as exc:
        logger.info("no diagnosis: %s", exc)
        return {}
    ids = batch["input_ids"].cpu()
    same = (pred == ids).float().mean()
    nxt = (pred[:, :-1] == ids[:, 1:]).float().mean() if ids.shape[1] > 1 else same * 0
    copies, nexts = torch.stack([same, nxt]).tolist()  # host sync
    return {"copies_input": round(copies, 4), "predicts_next": round(nexts, 4)}


#: How a finding names the loss it trained with (keys: CheckContext.loss_source()).
LOSS_NAMES = {
    "loss_fn": "loss_fn(model, batch) from the file",
    "output": "the model's own loss (output.loss)",
    "default": "tdiag's next-token cross-entropy (no loss_fn, no output.loss)",
}


_RELATION_TEXT = {
    0: "input_ids[t] (not shifted)",
    1: "input_ids[t + 1] (already shifted)",
    -1: "input_ids[t - 1] (shifted the wrong way)",
}

_SHIFT_ONCE = (
    "For next-token prediction the logits at t are scored against the token at t + 1, shifted "
    "once: F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()). Hugging Face "
    "causal LMs shift internally: pass labels=input_ids (-100 on padding) and do not shift them "
    "yourself."
)


def _label_text(probe: FreshBatches) -> str:
    if not probe.relations:
        return "none in the batch (the loss takes its targets from input_ids)"
    r = probe.relations[0]
    return f"{r.key}[t] = {_RELATION_TEXT[r.shift]}"


def _advice(ctx: CheckContext, probe: FreshBatches, diagnosis: dict[str, Any]) -> tuple[str, str]:
    """(the shortcut the trained copy learnt, or "", what to do)."""
    rel = probe.relations[0] if probe.relations else None
    copies = diagnosis.get("copies_input", 0.0)
    nexts = diagnosis.get("predicts_next", 0.0)
    if copies >= DIAGNOSIS_FRAC:
        learnt = f"it predicts the very token it is given ({copies:.0%} of positions)"
        if not ctx.causal:
            return learnt, (
                "A masked LM must hide what it predicts: replace the inputs at the labelled "
                "positions by the mask token and put -100 everywhere else "
                "(DataCollatorForLanguageModeling with mlm=True does both)."
            )
        if rel is not None and rel.key == "targets" and rel.shift == 0:
            return learnt, (
                "The (x, y) batch has y = x: y must be the next tokens, x = data[i : i + L], "
                "y = data[i + 1 : i + 1 + L]."
            )
        if rel is not None and rel.shift == -1:
            return learnt, (
                f"The {rel.key} are shifted the wrong way (input_ids.roll(1)?) and the loss "
                "shifts them back onto the inputs. " + _SHIFT_ONCE
            )
        where = "loss_fn" if ctx.loss_fn is not None else "the model's loss"
        return learnt, f"{where} compares the logits at t with the token at t. " + _SHIFT_ONCE
    if nexts >= DIAGNOSIS_FRAC and ctx.causal:
        return (
            f"it predicts the next token ({nexts:.0%} of positions), which a causal model must "
            "not see yet",
            "The model sees the future: apply a causal mask in every attention (see "
            "causal.leak). " + _SHIFT_ONCE,
        )
    return "", _SHIFT_ONCE + " Check also causal.leak, and that no label reaches the forward."


def _judge(
    ctx: CheckContext,
    probe: FreshBatches,
    losses: list[float],
    ln_v: float,
    floor: float,
    diagnosis: dict[str, Any],
    source: str,
) -> list[Finding]:
    window = losses[-WINDOW:]
    final = sum(window) / len(window)
    severity = _verdict(final, floor)
    if severity is None:
        return []
    stride = max(1, len(losses) // 12)
    curve = losses[::stride] + ([losses[-1]] if (len(losses) - 1) % stride else [])
    evidence: dict[str, Any] = {
        "initial_loss": round(losses[0], 4),
        "final_loss": round(final, 4),
        "ln_vocab": round(ln_v, 4),
        "vocab": probe.n_choices,
        "floor": round(floor, 4),
        "threshold": round(LEAK_FRAC * floor, 4),
        "summed": floor != min(ln_v, losses[0]),
        "steps": len(losses),
        "batch_shape": list(probe.template["input_ids"].shape),
        "lr": PROBE_LR,
        "loss": LOSS_NAMES[source],
        "labels": _label_text(probe),
        "loss_curve": [round(v, 4) for v in curve],
    } | diagnosis
    learnt, rec = _advice(ctx, probe, diagnosis)
    full = severity is Severity.ERROR
    of_what = "ln V" if floor == ln_v else "the initial loss"
    return [
        Finding(
            id="data.label-leak",
            severity=severity,
            title=f"Labels are {'' if full else 'partly '}predictable from the inputs",
            message=(
                f"Trained for {len(losses)} steps on fresh uniformly random tokens (V = "
                f"{probe.n_choices}: no model can beat ln V = {evidence['ln_vocab']:.3g} on "
                f"them), the loss on new random batches went from {evidence['initial_loss']:.3g} "
                f"to {evidence['final_loss']:.3g} ({final / floor:.0%} of {of_what}) with "
                f"{LOSS_NAMES[source]}; labels: {_label_text(probe)}"
                + (f". The trained copy learnt a shortcut: {learnt}." if learnt else ".")
                + " Training on real data would reward that shortcut, not prediction."
            ),
            evidence=evidence,
            recommendation=rec,
        )
    ]

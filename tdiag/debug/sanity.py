"""Training sanity: can the model overfit one small batch?

The oldest debugging advice for a new network: if it cannot drive the loss on a handful of
examples close to zero, something between the loss and the parameters is broken (a
detached output, a zero learning rate, a frozen model, a loss on the wrong targets). The
check trains a copy of the model, so the user's model is untouched.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdiag.debug.probes import training_copy
from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

logger = logging.getLogger(__name__)

#: Optimizer steps at most: a few dozen are enough for a small model on 2 short sequences.
MAX_STEPS = 60

#: Past MAX_STEPS, training goes on (up to MAX_STEPS_EXTENDED) while the loss still falls by
#: more than IMPROVING_FRAC over the last IMPROVING_WINDOW steps and the check has run less
#: than EXTRA_SECONDS: a model that learns steadily but slowly at the default learning rate
#: (a small bigram-like model) is not broken. A judgement.
MAX_STEPS_EXTENDED = 200
IMPROVING_WINDOW = 20
IMPROVING_FRAC = 0.1
EXTRA_SECONDS = 4.0

#: The overfit batch: this many samples of at most OVERFIT_SEQ tokens.
OVERFIT_BATCH = 2
OVERFIT_SEQ = 16

#: Default optimizer when the file has no make_optimizer: AdamW at a learning rate that
#: memorises a tiny batch fast without diverging; no weight decay (we want to overfit).
DEFAULT_LR = 3e-3

#: Success: the loss fell to this fraction of its initial value (or below DONE_ABS nats).
DONE_FRAC = 0.1
DONE_ABS = 0.05

#: Failure levels, as the fraction of the initial loss still left after MAX_STEPS. A judgement:
#: > 0.9 means the loss essentially did not move (a broken graph or a zero learning rate);
#: > 0.25 means it moves but too slowly to overfit (a too-small learning rate, a frozen part).
STUCK_FRAC = 0.9
SLOW_FRAC = 0.25


def _overfit_batch(ctx: CheckContext, *, seq: int | None) -> dict[str, Any]:
    """The first OVERFIT_BATCH samples, cut to ``seq`` tokens (None: full length)."""
    return {
        k: v[:OVERFIT_BATCH, :seq] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v
        for k, v in ctx.batch.items()
    }


# What a model that only accepts its full sequence length raises on a shorter one.
_SHAPE_ERRORS = (RuntimeError, ValueError, IndexError)


def _first_loss(ctx: CheckContext, model: nn.Module) -> tuple[dict[str, Any], torch.Tensor]:
    """The overfit batch (short if the model accepts it) and its loss."""
    short = _overfit_batch(ctx, seq=OVERFIT_SEQ)
    if short["input_ids"].shape[1] < ctx.input_ids.shape[1]:
        try:
            return short, ctx.loss(short, model=model)
        except _SHAPE_ERRORS as exc:
            logger.info(
                "model rejects %d-token sequences (%s); using full length", OVERFIT_SEQ, exc
            )
    full = _overfit_batch(ctx, seq=None)
    return full, ctx.loss(full, model=model)


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g.get("lr", math.nan)) for g in opt.param_groups]


@register_check("train.cannot-overfit", family="sanity", title="Cannot overfit one small batch")
def check_cannot_overfit(ctx: CheckContext) -> list[Finding]:
    """Train a copy on one batch for up to MAX_STEPS steps; the loss must fall close to zero."""
    model = training_copy(ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SkipCheck("the model has no trainable parameter")
    if ctx.make_optimizer is not None:
        opt = ctx.make_optimizer(model)
        if isinstance(opt, list | tuple):  # (optimizer, scheduler) as some files return
            opt = opt[0]
        source = "make_optimizer(model) from the file"
    else:
        opt = torch.optim.AdamW(trainable, lr=DEFAULT_LR, weight_decay=0.0)
        source = f"AdamW(lr={DEFAULT_LR:g})"
    losses: list[float] = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(ctx.seed)
        batch, loss = _first_loss(ctx, model)
        for step in range(MAX_STEPS_EXTENDED):
            if step:
                loss = ctx.loss(batch, model=model)
            value = float(loss.detach())  # host sync: the check needs the value to stop early
            losses.append(value)
            if not math.isfinite(value):
                if step == 0:
                    raise SkipCheck(
                        "the loss is already non-finite at init (see numerics.nonfinite-forward "
                        "and data.labels-all-ignored)"
                    )
                break
            if value < DONE_ABS or value < DONE_FRAC * losses[0]:
                break
            if not loss.requires_grad:
                break
            if step >= MAX_STEPS - 1 and not _improving(losses, time.perf_counter() - t0):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable)
    return _judge(
        losses,
        source=source,
        lrs=_lrs(opt),
        grad_free=not loss.requires_grad,
        seq_len=int(batch["input_ids"].shape[1]),
        half=half,
    )


def _improving(losses: list[float], elapsed: float) -> bool:
    """Still worth training past MAX_STEPS: time left and a clear recent decrease."""
    if elapsed > EXTRA_SECONDS or len(losses) <= IMPROVING_WINDOW:
        return False
    return losses[-1] < (1.0 - IMPROVING_FRAC) * losses[-1 - IMPROVING_WINDOW]


def _judge(
    losses: list[float],
    *,
    source: str,
    lrs: list[float],
    grad_free: bool,
    seq_len: int,
    half: bool = False,
) -> list[Finding]:
    first, last = losses[0], losses[-1]
    best = min(losses)
    evidence: dict[str, Any] = {
        "initial_loss": first,
        "final_loss": last,
        "best_loss": best,
        "steps": len(losses),
        "seq_len": seq_len,
        "optimizer": source,
        "lr": lrs,
        "loss_curve": losses[:: max(1, len(losses) // 12)],
    }
    rec = (
        "Make sure the loss is computed from the model's output without .detach()/.item(), that "
        "optimizer.step() sees the model's parameters with a learning rate > 0 (try 1e-3 with "
        "AdamW), that the parameters have requires_grad=True, and that labels are aligned with "
        "the logits (shifted by one for next-token prediction)."
    )
    if not math.isfinite(last):
        return [
            Finding(
                id="train.cannot-overfit",
                severity=Severity.ERROR,
                title="Loss becomes non-finite while overfitting one batch",
                message=(
                    f"Training on one small batch with {source}, the loss went from {first:.3g} "
                    f"to {last} after {len(losses)} step(s)."
                ),
                evidence=evidence,
                recommendation=(
                    "The parameters are float16/bfloat16: keep float32 weights and train under "
                    "torch.autocast instead (Adam's update underflows in half precision). "
                    if half
                    else ""
                )
                + "Lower the learning rate, add warmup and gradient clipping "
                "(clip_grad_norm_(params, 1.0)); look for log(0), division by zero or fp16 overflow.",
            )
        ]
    if grad_free:
        return [
            Finding(
                id="train.cannot-overfit",
                severity=Severity.ERROR,
                title="The loss does not depend on any trainable parameter",
                message=f"The loss ({first:.3g}) has no gradient: nothing can be trained.",
                evidence=evidence,
                recommendation=rec,
            )
        ]
    frac = (best / first) if first > 0 else 0.0
    if best < DONE_ABS or frac <= SLOW_FRAC:
        return []
    stuck = frac > STUCK_FRAC
    return [
        Finding(
            id="train.cannot-overfit",
            severity=Severity.ERROR if stuck else Severity.WARNING,
            title="Cannot overfit one small batch",
            message=(
                f"Training on {OVERFIT_BATCH} sequences of <= {seq_len} tokens for "
                f"{len(losses)} steps with {source} (lr {_fmt(lrs)}), the loss only went from "
                f"{first:.3g} to {best:.3g} ({frac:.0%} of the initial loss left)"
                + ("; it does not decrease." if stuck else "; it decreases too slowly.")
            ),
            evidence=evidence,
            recommendation=rec,
        )
    ]


def _fmt(lrs: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in lrs)

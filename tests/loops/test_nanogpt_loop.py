"""A nanoGPT-style ``train.py`` loop (karpathy/nanoGPT, reduced to CPU fp32) with the Monitor
dropped in the way its README tells a user to: tdiag's history against the loop's own
numbers at the same steps.

The loop's shape is nanoGPT's: ``while True``; the LR set by hand each iteration from a
warm-up + cosine schedule; ``gradient_accumulation_steps`` micro-batches with
``loss = loss / gradient_accumulation_steps`` before ``backward()`` and the next batch
fetched while the backward is pending; ``clip_grad_norm_`` when ``grad_clip != 0``;
``optimizer.step()``; ``zero_grad(set_to_none=True)``; ``iter_num += 1`` and ``break`` once
``iter_num > max_iters`` (so ``max_iters + 1`` optimizer steps, as in nanoGPT); no ``with``:
``mon.close()`` at the end. ``mon.step(loss * accum, tokens=...)`` passes what nanoGPT prints
as ``lossf``: the last micro-batch's unscaled loss.

Ground truth: the norm ``clip_grad_norm_`` returns (``torch.nn.utils.get_total_norm`` when
the loop does not clip), which the loop does NOT pass to the Monitor, and the LR it set.
"""

from __future__ import annotations

import math

import pytest
import torch

from tdiag import Monitor

from .helpers import (
    TinyGPT,
    assert_no_mismatch,
    batch,
    grad_norm,
    history_rows,
    lm_loss,
    mismatch,
    quiet_options,
    series,
    tdiag_warnings,
    unless,
)

MAX_ITERS, LOG_EVERY = 8, 2
LEARNING_RATE, MIN_LR, WARMUP_ITERS, LR_DECAY_ITERS = 6e-4, 6e-5, 3, 8
BATCH, BLOCK = 2, 16


def get_lr(it: int) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to ``MIN_LR``, then flat."""
    if it < WARMUP_ITERS:
        return LEARNING_RATE * (it + 1) / (WARMUP_ITERS + 1)
    if it > LR_DECAY_ITERS:
        return MIN_LR
    ratio = (it - WARMUP_ITERS) / (LR_DECAY_ITERS - WARMUP_ITERS)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LEARNING_RATE - MIN_LR)


def train(run_dir, *, accum: int, grad_clip: float, step_per_micro_batch: bool = False) -> dict:
    """Run the loop; return what it knows per optimizer step (1-based, like the Monitor)."""
    torch.manual_seed(0)
    model = TinyGPT(d=32, layers=2, heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95))
    config = {"grad_clip": grad_clip, "gradient_accumulation_steps": accum}
    mon = Monitor(model, optimizer, config=config, **quiet_options(run_dir, log_every=LOG_EVERY))
    truth: dict[str, dict[int, float]] = {"lr": {}, "norm": {}, "post_clip": {}, "lossf": {}}
    micro_losses: dict[int, list[float]] = {}
    draws = iter(range(10_000))

    def get_batch() -> torch.Tensor:
        return batch(next(draws), BATCH, BLOCK)

    X = get_batch()
    iter_num = 0
    while True:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        step = iter_num + 1
        for _micro_step in range(accum):
            logits = model(X)
            loss = lm_loss(logits, X)
            micro_losses.setdefault(step, []).append(loss.item())  # test bookkeeping: host sync
            loss = loss / accum  # scale the loss to account for gradient accumulation
            X = get_batch()  # async prefetch in nanoGPT
            loss.backward()
            if step_per_micro_batch:  # the misuse: one mon.step() per micro-batch
                mon.step(loss * accum, tokens=X.numel())
        if grad_clip != 0.0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        truth["norm"][step] = float(norm)
        truth["post_clip"][step] = grad_norm(model.parameters())
        truth["lr"][step] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lossf = loss.item() * accum  # what nanoGPT prints
        truth["lossf"][step] = lossf
        if not step_per_micro_batch:
            mon.step(loss * accum, tokens=accum * X.numel())  # tokens of this rank's step
        iter_num += 1
        if iter_num > MAX_ITERS:
            break
    mon.close()
    truth["micro_losses"] = micro_losses  # type: ignore[assignment]
    return truth


def _log_steps(last: int) -> tuple[list[int], list[int]]:
    """(every row's step, the rows of step 1 and each ``LOG_EVERY``-th step). ``close()`` also
    flushes the last partial interval (step 9): the Monitor measures gradients on the steps
    it knows to be log steps, so the flush row's norms are not promised; its loss, LR and
    tokens are."""
    probed = [1, *range(LOG_EVERY, last + 1, LOG_EVERY)]
    return (probed if probed[-1] == last else [*probed, last]), probed


def _interval_means(values: dict[int, float], log_steps: list[int]) -> dict[int, float]:
    out, prev = {}, 0
    for s in log_steps:
        vals = [values[k] for k in range(prev + 1, s + 1)]
        out[s], prev = math.fsum(vals) / len(vals), s
    return out


@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("grad_clip", [0.0, 0.05], ids=["no-clip", "clip"])
def test_history_matches_the_loops_own_numbers(tmp_path, grad_clip, accum):
    truth = train(tmp_path / "run", accum=accum, grad_clip=grad_clip)
    rows = history_rows(tmp_path / "run")
    last = MAX_ITERS + 1
    log_steps, probed = _log_steps(last)
    assert [s for s in rows if "train/loss" in rows[s]] == log_steps
    if grad_clip:  # clipping really happened
        assert min(truth["norm"].values()) > 10 * grad_clip
    at_log = {k: {s: truth[k][s] for s in log_steps} for k in ("lr", "lossf")}
    at_log |= {k: {s: truth[k][s] for s in probed} for k in ("norm", "post_clip")}
    # The loss passed is float32 ``loss / accum * accum`` (÷ and × by 4 are exact) and the
    # Monitor keeps it as is: exact. train/loss is the interval's mean of those (float64).
    assert_no_mismatch(
        mismatch("train/grad_norm", series(rows, "train/grad_norm"), at_log["norm"], rel=1e-5),
        mismatch(
            "train/grad_norm_post_clip",
            series(rows, "train/grad_norm_post_clip"),
            at_log["post_clip"],
            rel=1e-5,
        ),
        mismatch("train/lr", series(rows, "train/lr"), at_log["lr"]),
        mismatch("train/loss_last", series(rows, "train/loss_last"), at_log["lossf"]),
        mismatch(
            "train/loss", series(rows, "train/loss"), _interval_means(truth["lossf"], log_steps)
        ),
        mismatch(
            "train/tokens",
            series(rows, "train/tokens"),
            {s: float(s * accum * BATCH * BLOCK) for s in log_steps},
        ),
    )


def test_step_per_micro_batch_warns_once_and_counts_optimizer_steps(tmp_path):
    """The misuse: ``mon.step()`` inside the accumulation loop (4 calls per optimizer step).
    One warning; the history counts optimizer steps (9, not 36), with each step's gradient
    norm, LR and tokens; a step's loss is the mean of its 4 micro-batch losses. The pattern
    is known after two optimizer steps, so the first row is step 2's (covering steps 1-2:
    its train/loss is their mean), not step 1's (see tdiag/monitor/cadence.py)."""
    accum, grad_clip = 4, 0.05
    with tdiag_warnings() as warned:
        truth = train(tmp_path / "run", accum=accum, grad_clip=grad_clip, step_per_micro_batch=True)
    rows = history_rows(tmp_path / "run")
    last = MAX_ITERS + 1
    log_steps, probed = _log_steps(last)
    log_steps, probed = log_steps[1:], probed[1:]  # no row at step 1 (see the docstring)
    step_loss = {s: math.fsum(v) / len(v) for s, v in truth["micro_losses"].items()}
    assert_no_mismatch(
        unless(len(warned) == 1, f"expected one tdiag warning, got {len(warned)}: {warned!r}"),
        unless(
            [s for s in rows if "train/loss" in rows[s]] == log_steps,
            f"log rows at {sorted(rows)}, expected {log_steps} (optimizer steps)",
        ),
        unless(
            not any(row.get("train/skipped_steps", 0.0) for row in rows.values()),
            f"micro-batches counted as skipped steps: {series(rows, 'train/skipped_steps')}",
        ),
        mismatch(
            "train/grad_norm",
            series(rows, "train/grad_norm"),
            {s: truth["norm"][s] for s in probed},
            rel=1e-5,
        ),
        mismatch("train/lr", series(rows, "train/lr"), {s: truth["lr"][s] for s in log_steps}),
        mismatch(
            "train/tokens",
            series(rows, "train/tokens"),
            {s: float(s * accum * BATCH * BLOCK) for s in log_steps},
        ),
        mismatch(
            "train/loss",
            series(rows, "train/loss"),
            _interval_means(step_loss, log_steps),
            rel=1e-6,  # float32 micro-batch losses, summed in a different order
        ),
    )

"""``mon.step()`` per micro-batch vs skipped steps (cadence.py), and the pre-clip norm probe
in the loop shapes that make them hard: clip before step, fused GradScaler, ``step(closure)``."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from tdiag.monitor import Monitor
from tdiag.monitor.cadence import StepCadence
from tdiag.monitor.probe import preclip_factor

from .conftest import ListSink, lm_loss, make_batch, quiet_options


def _verdicts(pattern: str) -> list[str]:
    """One verdict per call; ``pattern``: ``s`` a call after an optimizer step, ``.`` none."""
    cad = StepCadence()
    return [cad.observe(c == "s") for c in pattern]


def test_cadence_decides_at_once_for_a_correct_loop():
    assert _verdicts("sss") == ["record", "record", "record"]
    assert _verdicts("???".replace("?", "s"))[0] == "record"
    cad = StepCadence()
    assert cad.observe(None) == "record" and cad.mode == "per-call"  # no optimizer known


@pytest.mark.parametrize(
    ("pattern", "last", "placement"),
    [
        ("...s...s", "regroup", "after"),  # mon.step() after optimizer.step(), k = 4
        ("....s...s", "regroup", "before"),  # mon.step() inside the micro loop, k = 4
        (".s.s", "regroup", "after"),  # k = 2
    ],
)
def test_cadence_recognises_micro_batches(pattern, last, placement):
    cad = StepCadence()
    verdicts = [cad.observe(c == "s") for c in pattern]
    assert verdicts[:-1] == ["defer"] * (len(pattern) - 1)
    assert (
        verdicts[-1] == last
        and cad.placement == placement
        and cad.period == 4 - 2 * (pattern == ".s.s")
    )
    follow = "...s" if placement == "after" else "s..."
    assert [cad.observe(c == "s") for c in follow] == (
        ["fold", "fold", "fold", "close"]
        if placement == "after"
        else ["close_prev", "fold", "fold", "fold"]
    )


@pytest.mark.parametrize("pattern", [".ss", "...sss", "..s....s", ".s..s"])
def test_cadence_reads_skipped_steps_as_steps(pattern):
    verdicts = _verdicts(pattern)
    assert "flush" in verdicts and "regroup" not in verdicts
    assert verdicts[verdicts.index("flush") + 1 :] == ["record"] * (
        len(verdicts) - verdicts.index("flush") - 1
    )


def test_cadence_gives_up_deferring_when_the_optimizer_never_steps():
    verdicts = _verdicts("." * 64)
    assert verdicts[-1] == "flush" and set(verdicts[:-1]) == {"defer"}


def test_preclip_factor():
    assert preclip_factor(9.0, 1.0, None) == 1.0  # clipped by 3x, no scaling
    assert preclip_factor(4.0 * 2.0**32, 4.0, None) == 2.0**-16  # unscale_() by 2**16 only
    assert preclip_factor(9.0 * 2.0**32, 1.0, None) is None  # scaled and clipped, S unknown
    assert preclip_factor(4.0 * 2.0**32, 1.0, 2.0**16) == 2.0**-16  # S known
    assert preclip_factor(4.0, None, None) == 1.0


def _micro_loop(model, mon, opt, steps, accum, *, after=True):
    """Clip before step; mon.step() per micro-batch, after optimizer.step() for the last."""
    truth = []
    for step in range(1, steps + 1):
        losses = []
        for micro in range(accum):
            ids = make_batch(100 * step + micro)
            loss = lm_loss(model(ids), ids)
            (loss / accum).backward()
            losses.append(loss.item())
            if micro < accum - 1 or not after:
                mon.step(loss, tokens=ids.numel())
        norm = nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after:
            mon.step(loss, tokens=ids.numel())
        truth.append((float(norm), math.fsum(losses) / accum))
    return truth


@pytest.mark.parametrize("after", [True, False])
def test_step_per_micro_batch_is_counted_per_optimizer_step(tiny_gpt, tmp_path, caplog, after):
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-2)
    sink = ListSink()
    with (
        caplog.at_level(logging.WARNING, logger="tdiag"),
        Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, log_every=2)) as mon,
    ):
        truth = _micro_loop(tiny_gpt, mon, opt, 6, 3, after=after)
    assert caplog.text.count("called 3 times per optimizer step") == 1
    rows = sink.merged()
    assert sorted(rows) == [2, 4, 6]  # optimizer steps; the first row once the period is known
    assert rows[6]["train/tokens"] == 6 * 3 * 64
    assert all(rows[s]["train/skipped_steps"] == 0.0 for s in rows)
    for s in (4, 6):
        assert math.isclose(rows[s]["train/grad_norm"], truth[s - 1][0], rel_tol=1e-5)
        assert math.isclose(rows[s]["train/loss_last"], truth[s - 1][1], rel_tol=1e-5)
        assert math.isclose(rows[s]["train/grad_norm_post_clip"], 0.1, rel_tol=1e-4)


def test_scaler_skips_in_a_micro_batch_like_pattern_stay_steps(tiny_gpt, tmp_path, caplog):
    # Steps 1 and 3 skipped by the scaler (an inf loss -> inf gradients): calls with and
    # without optimizer steps alternate, as micro-batches of 2 would, but the gradients of the
    # calls without a step were not finite: real (skipped) steps, no warning.
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1000)
    sink = ListSink()
    with (
        caplog.at_level(logging.WARNING, logger="tdiag"),
        Monitor(
            tiny_gpt, opt, scaler=scaler, sinks=[sink], **quiet_options(tmp_path, log_every=2)
        ) as mon,
    ):
        for step in range(1, 7):
            ids = make_batch(step)
            loss = lm_loss(tiny_gpt(ids), ids)
            if step in (1, 3):
                loss = loss * math.inf
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            mon.step(loss.detach().clamp(max=1e4), tokens=ids.numel())
    assert "times per optimizer step" not in caplog.text
    rows = sink.merged()
    assert max(rows) == 6 and sum(r["train/skipped_steps"] for r in rows.values()) == 2.0


def test_fused_scaler_clip_before_step_gives_the_unscaled_pre_clip_norm(tiny_gpt, tmp_path):
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sink = ListSink()
    norms = []
    with Monitor(
        tiny_gpt, opt, scaler=scaler, sinks=[sink], **quiet_options(tmp_path, log_every=1)
    ) as mon:
        for step in range(1, 4):
            ids = make_batch(step)
            loss = lm_loss(tiny_gpt(ids), ids)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norms.append(float(nn.utils.clip_grad_norm_(tiny_gpt.parameters(), 0.05)))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            mon.step(loss)
    rows = sink.merged()
    for s in (1, 2, 3):
        assert math.isclose(rows[s]["train/grad_norm"], norms[s - 1], rel_tol=1e-5)
        assert math.isclose(rows[s]["train/grad_norm_post_clip"], 0.05, rel_tol=1e-4)


def test_step_with_closure_measures_this_steps_gradient(tiny_gpt, tmp_path):
    # Lightning's shape: optimizer.step(closure), the backward and the clip inside the closure;
    # a scheduler steps after it. The norm, update ratio and LR are of this step.
    opt = torch.optim.SGD(tiny_gpt.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    sink = ListSink()
    truth = []
    with Monitor(tiny_gpt, opt, sinks=[sink], **quiet_options(tmp_path, log_every=1)) as mon:
        for step in range(1, 4):
            ids = make_batch(step)

            def closure(ids=ids):
                opt.zero_grad()
                loss = lm_loss(tiny_gpt(ids), ids)
                loss.backward()
                truth.append((float(nn.utils.clip_grad_norm_(tiny_gpt.parameters(), 0.01)),))
                return loss

            lr = opt.param_groups[0]["lr"]
            loss = opt.step(closure)
            sched.step()
            truth[-1] = (*truth[-1], lr)
            mon.step(loss)
    rows = sink.merged()
    for s in (1, 2, 3):
        assert math.isclose(rows[s]["train/grad_norm"], truth[s - 1][0], rel_tol=1e-5)
        assert rows[s]["train/lr"] == truth[s - 1][1]
        assert rows[s]["train/update_ratio"] > 0

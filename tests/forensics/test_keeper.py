"""The keeper, the RNG streams and the scratch copies: what a replay relies on."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tdiag.forensics import Keeper, preserved_rng, replay
from tdiag.forensics.scratch import scratch_model, scratch_optimizer
from tdiag.monitor.config import MonitorConfig
from tests.forensics.runs import TinyNet, loss_fn, make_batch


def _train_steps(model, opt, keeper, steps, start=1) -> None:
    for step in range(start, start + steps):
        batch = make_batch(step)
        keeper.observe_forward()
        loss_fn(model, batch).backward()
        keeper.observe_optimizer_step(opt)
        opt.step()
        opt.zero_grad()
        keeper.record(step, batch)


def test_batches_are_copied_unless_told_not_to() -> None:
    buf = {"x": torch.zeros(2, 3)}
    copying, referencing = Keeper(), Keeper(copy_batches=False)
    copying.record(1, buf)
    referencing.record(1, buf)
    buf["x"].fill_(7.0)  # a loop that reuses its input buffer
    assert copying.batches_since(0)[0].batch["x"].sum() == 0.0
    assert referencing.batches_since(0)[0].batch["x"].sum() == 42.0


def test_snapshot_restores_into_a_scratch_copy_and_leaves_the_live_model() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    keeper = Keeper(snapshot_every=3)
    _train_steps(model, opt, keeper, 3)
    assert keeper.maybe_snapshot(3, model, opt)
    at_snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    adam_at_snapshot = {k: v.clone() for k, v in opt.state[model.inp.weight].items()}
    _train_steps(model, opt, keeper, 2, start=4)
    assert not keeper.maybe_snapshot(5, model, opt)  # not due before step 6
    live = {k: v.clone() for k, v in model.state_dict().items()}
    scratch, memo = scratch_model(model)
    sopt = scratch_optimizer(opt, memo)
    snap = keeper.restore_into(scratch, sopt)
    assert snap.step == 3
    assert all(torch.equal(scratch.state_dict()[k], at_snapshot[k]) for k in at_snapshot)
    restored = sopt.state[scratch.inp.weight]
    assert all(torch.equal(restored[k], adam_at_snapshot[k]) for k in adam_at_snapshot)
    assert all(torch.equal(model.state_dict()[k], live[k]) for k in live)  # untouched
    assert [r.step for r in keeper.batches_since(3)] == [4, 5]
    assert keeper.record_before(4).step == 3  # the snapshot step's record is kept
    assert keeper.batches_since(3)[0].lrs == [1e-2]


def test_scratch_copies_carry_no_hooks_and_share_nothing() -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append("fwd"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step"))
    scratch, memo = scratch_model(model)
    sopt = scratch_optimizer(opt, memo)
    loss_fn(scratch, make_batch(1)).backward()
    sopt.step()
    assert calls == []
    assert not any(p is q for p, q in zip(model.parameters(), scratch.parameters(), strict=True))
    assert sopt.param_groups[0]["params"][0] is next(scratch.parameters())


def test_preserved_rng_puts_every_stream_back() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with preserved_rng():
        torch.rand(3), np.random.rand(3), random.random()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_replay_says_why_it_cannot_run() -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keeper = Keeper()
    r = replay(keeper, model, opt, None, until_step=3)
    assert r.cause is None and "loss_fn" in r.reason
    r = replay(keeper, model, opt, loss_fn, until_step=3)
    assert r.cause is None and "snapshot" in r.reason
    keeper.maybe_snapshot(0, model, opt)
    keeper.record(2, make_batch(2))  # step 1 missing
    r = replay(keeper, model, opt, loss_fn, until_step=2)
    assert r.cause is None and "were not all kept" in r.reason
    with pytest.raises(ValueError, match="threshold"):
        replay(keeper, model, opt, loss_fn, until_step=2, kind="spike")


def test_bad_options_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="snapshot_every"):
        Keeper(snapshot_every=0)
    with pytest.raises(ValueError, match="loss_fn"):
        MonitorConfig(forensics=True)
    with pytest.raises(ValueError, match="snapshot_every"):
        MonitorConfig(snapshot_every=0)
    with pytest.raises(TypeError, match="loss_fn"):
        MonitorConfig(loss_fn=3)


def test_a_spike_replay_names_the_step_and_its_cause() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    keeper = Keeper()
    keeper.maybe_snapshot(0, model, opt)
    for step in range(1, 6):
        batch = make_batch(step)
        if step == 4:
            batch["y"] = batch["y"] * 30.0  # targets far out of distribution
        keeper.observe_forward()
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
        keeper.record(step, batch)
    r = replay(keeper, model, opt, loss_fn, until_step=5, kind="spike", threshold=50.0)
    assert r.step == 4 and r.cause == "data" and r.kind == "spike"
    assert set(r.evidence["moved"]) == {"inp", "gate", "act", "drop", "flaky", "out"}
    assert replay(
        keeper, model, opt, loss_fn, until_step=3, kind="spike", threshold=50.0
    ).cause == (
        "transient"  # no spike up to step 3
    )


def test_rebase_after_a_rollback_drops_the_stale_records() -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keeper = Keeper(snapshot_every=10)
    keeper.maybe_snapshot(0, model, opt)
    _train_steps(model, opt, keeper, 4)
    keeper.rebase(4)  # the live model was reset to the snapshot after step 4
    assert keeper.batches_since(0) == [] and keeper.latest_snapshot().step == 4
    _train_steps(model, opt, keeper, 2, start=5)
    assert [r.step for r in keeper.batches_since(4)] == [5, 6]
    with pytest.raises(LookupError):
        Keeper().rebase(3)

"""The opt-in guard (tdiag/monitor/guard.py): stop, skip and rollback on a run that goes NaN at
a known step (an all-padding batch: a masked mean of 0/0), rollback on a loss spike, and the
default leaving the run bit-identical to no Monitor."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tdiag
from tdiag import Monitor
from tdiag.history import read_history
from tdiag.monitor import TrainingStopped

from .conftest import VOCAB, ListSink, TinyGPT, make_batch, quiet_options
from .test_spikes import SPIKE_STEPS, pattern_batch

PAD = 0
NAN_STEP = 7


def masked_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over non-pad targets: an all-pad batch gives 0/0 = NaN (loss and
    every gradient), the classic empty-batch bug."""
    logits = model(ids)
    targets = ids[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    mask = (targets != PAD).float()
    return (ce * mask).sum() / mask.sum()


def batch(step: int, bad: tuple[int, ...]) -> torch.Tensor:
    ids = make_batch(step).clamp(min=1)
    return torch.full_like(ids, PAD) if step in bad else ids


def fresh(seed: int = 0) -> tuple[TinyGPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyGPT()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(
    model, opt, steps, *, mon=None, bad=(NAN_STEP,), skip_update=(), start=1, check_stop=True
):
    """A plain loop; ``skip_update``: steps whose optimizer.step() the reference leaves out."""
    done = 0
    for step in range(start, steps + 1):
        ids = batch(step, bad)
        loss = masked_loss(model, ids)
        loss.backward()
        if step not in skip_update:
            opt.step()
        opt.zero_grad(set_to_none=True)
        done = step
        if mon is not None:
            mon.step(loss, tokens=ids.numel())
            if check_stop and mon.should_stop:
                break
    return done


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def by_id(findings, fid):
    return [f for f in findings if f.id == fid]


# -- the default changes nothing ------------------------------------------------------------
@pytest.mark.parametrize("bad", [(), (NAN_STEP,)])
def test_default_monitor_leaves_the_run_bit_identical(tmp_path, bad):
    model, opt = fresh()
    ref_model, ref_opt = copy.deepcopy(model), None
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    train(ref_model, ref_opt, 12, bad=bad)
    torch.manual_seed(1)
    with Monitor(model, opt, **quiet_options(tmp_path, log_every=5)) as mon:
        train(model, opt, 12, mon=mon, bad=bad)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN too
    assert mon.guard_events == [] and not mon.should_stop


# -- stop -----------------------------------------------------------------------------------
def test_stop_ends_the_run_at_the_nan_step_with_the_report(tmp_path):
    model, opt = fresh()
    ref, ref_opt = fresh()
    train(ref, ref_opt, NAN_STEP - 1)
    opts = quiet_options(tmp_path, log_every=5, on_nonfinite="stop", report=True)
    with Monitor(model, opt, **opts) as mon:
        done = train(model, opt, 20, mon=mon)
    assert done == NAN_STEP and mon.should_stop and mon.global_step == NAN_STEP
    assert finite(model) and same(params(model), params(ref))  # step 7's update not applied
    (f,) = by_id(mon.findings, "train.nonfinite-grad")
    assert f.step == NAN_STEP and f.evidence["guard"]["action"] == "stop"
    assert [e["step"] for e in mon.guard_events] == [NAN_STEP]
    run_dir = Path(opts["run_dir"])
    assert (run_dir / "report.json").is_file()
    rows, _ = read_history(run_dir / "history.jsonl")
    assert rows["step"].max() == NAN_STEP  # the stopped step was logged


def test_a_loop_that_goes_on_after_stop_gets_training_stopped(tmp_path):
    model, opt = fresh()
    with (
        pytest.raises(TrainingStopped, match="step 7"),
        Monitor(model, opt, **quiet_options(tmp_path, log_every=5, on_nonfinite="stop")) as mon,
    ):
        train(model, opt, 20, mon=mon, check_stop=False)
    assert mon.global_step == NAN_STEP and finite(model)


def test_stop_without_an_optimizer_checks_the_loss(tmp_path):
    model, opt = fresh()
    with Monitor(model, **quiet_options(tmp_path, log_every=5, on_nonfinite="stop")) as mon:
        done = train(model, opt, 20, mon=mon)
    assert done == NAN_STEP and mon.guard_events[0]["trigger"] == "train.nonfinite-loss"


# -- skip -----------------------------------------------------------------------------------
def test_skip_leaves_out_the_failing_update_only(tmp_path):
    model, opt = fresh()
    ref, ref_opt = fresh()
    train(ref, ref_opt, 15, skip_update=(NAN_STEP,))
    sink = ListSink()
    with Monitor(
        model, opt, sinks=[sink], **quiet_options(tmp_path, log_every=5, on_nonfinite="skip")
    ) as mon:
        done = train(model, opt, 15, mon=mon)
    assert done == 15 and not mon.should_stop
    assert finite(model) and same(params(model), params(ref))
    assert mon.guard_events == [
        {
            "trigger": "train.nonfinite-grad",
            "action": "skip",
            "step": NAN_STEP,
            "update_skipped": True,
        }
    ]
    assert by_id(mon.findings, "train.nonfinite-loss")[0].step == NAN_STEP
    assert sink.merged()[10]["train/skipped_steps"] == 1.0


# -- rollback -------------------------------------------------------------------------------
def test_rollback_restores_the_snapshot_and_skips_the_batch(tmp_path):
    steps = 15
    model, opt = fresh()
    with Monitor(
        model, opt, **quiet_options(tmp_path, log_every=5, on_nonfinite="rollback")
    ) as mon:
        train(model, opt, steps, mon=mon)
    (event,) = mon.guard_events
    assert event["action"] == "rollback" and event["step"] == NAN_STEP
    snap_step = event["restored_step"]
    assert snap_step == 1  # the first healthy log step (the guard keeper's cadence is 50)
    assert event["discarded_steps"] == [snap_step + 1, NAN_STEP]
    # the reference: the snapshot's state, then the updates of the steps after the NaN
    ref, ref_opt = fresh()
    train(ref, ref_opt, snap_step)
    train(ref, ref_opt, steps, start=NAN_STEP + 1)
    assert finite(model) and same(params(model), params(ref))


def test_rollback_on_a_spike_goes_back_before_it(tmp_path):
    from .test_spikes import run

    mon, _, _ = run(tmp_path, corrupt=SPIKE_STEPS, on_spike="rollback")
    (event,) = mon.guard_events
    assert event["trigger"] == "train.loss-spikes" and event["action"] == "rollback"
    assert event["step"] == 90 and event["spike_step"] == SPIKE_STEPS[0]
    assert event["restored_step"] == 60  # the guard keeper's second snapshot (cadence 50)
    (f,) = [f for f in mon.findings if f.id == "train.loss-spikes"]
    assert f.evidence["guard_action"] == "rollback"
    # the reference: train to 60, then the batches 91..120 (61..90 are skipped)
    from .conftest import lm_loss

    torch.manual_seed(0)
    ref = TinyGPT()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    for step in [*range(1, 61), *range(91, 121)]:
        ids = pattern_batch(step)
        lm_loss(ref(ids), ids).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    assert same(params(mon.model), params(ref))


def test_stop_on_a_spike(tmp_path):
    from .test_spikes import run

    with pytest.raises(TrainingStopped, match="step 90"):
        run(tmp_path, corrupt=SPIKE_STEPS, on_spike="stop")


def test_after_a_stop_no_update_reaches_the_weights(tmp_path):
    from .conftest import lm_loss

    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    at_stop = None
    opts = quiet_options(tmp_path, log_every=10, on_spike="stop")
    with pytest.raises(TrainingStopped), Monitor(model, opt, **opts) as mon:
        for step in range(1, 121):  # the loop never looks at mon.should_stop
            ids = pattern_batch(step)
            if step in SPIKE_STEPS:
                g = torch.Generator().manual_seed(1000 + step)
                ids = torch.randint(0, VOCAB, ids.shape, generator=g)
            loss = lm_loss(model(ids), ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss)
            if mon.should_stop and at_stop is None:
                at_stop = (step, params(model))
    assert at_stop is not None and at_stop[0] == 90
    assert same(params(model), at_stop[1])  # step 91's optimizer.step() changed nothing


# -- options and cost -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"on_spike": "skip"}, "on_spike='skip' is not possible"),
        ({"on_spike": "halt"}, "on_spike must be"),
        ({"on_nonfinite": "pause"}, "on_nonfinite must be"),
    ],
)
def test_bad_guard_options_are_named(tmp_path, tiny_gpt, kw, match):
    with pytest.raises(ValueError, match=match):
        Monitor(tiny_gpt, **quiet_options(tmp_path, **kw))


def test_skip_needs_an_optimizer(tmp_path, tiny_gpt):
    with pytest.raises(ValueError, match="needs optimizer="):
        Monitor(tiny_gpt, **quiet_options(tmp_path, on_nonfinite="skip"))


def test_the_guard_costs_one_host_sync_per_step(tmp_path, monkeypatch):
    tdiag_dir = str(Path(tdiag.__file__).parent)
    calls: list[str] = []
    original = torch.Tensor.__bool__

    def counted(self):
        if sys._getframe(1).f_code.co_filename.startswith(tdiag_dir):
            calls.append("bool")
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted)
    model, opt = fresh()
    with Monitor(model, opt, **quiet_options(tmp_path, log_every=100, on_nonfinite="skip")) as mon:
        train(model, opt, 6, mon=mon, bad=())
        assert len(calls) == 6
    assert len(calls) == 7  # and the check of the weights at close


# -- forensics: the step the guard caught is replayed ---------------------------------------
def test_a_skipped_step_is_replayed_by_forensics(tmp_path):
    model, opt = fresh()
    opts = quiet_options(
        tmp_path, log_every=5, on_nonfinite="skip", forensics=True, loss_fn=masked_loss
    )
    with Monitor(model, opt, **opts) as mon:
        for step in range(1, 11):
            ids = batch(step, (NAN_STEP,))
            loss = masked_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss, batch=ids)
    (f,) = by_id(mon.findings, "train.nonfinite-grad")
    fx = f.evidence["forensics"]
    assert fx["step"] == NAN_STEP and fx["cause"] == "data", fx
    assert f.evidence["guard"]["action"] == "skip" and finite(model)


# -- the adapters stop the framework's loop -------------------------------------------------
def test_lightning_trainer_stops_on_the_guard(tmp_path):
    L = pytest.importorskip("lightning")
    from tdiag.integrations.lightning import TdiagLightningCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.head = torch.nn.Linear(16, 32)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            logits = self.head(self.emb(ids[:, :-1]))
            loss = F.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
            return loss * math.nan if batch_idx == 3 else loss  # NaN at step 4

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    ids = torch.randint(0, 32, (64, 9), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    cb = TdiagLightningCallback(
        run_dir=str(tmp_path / "run"),
        log_every=2,
        tensorboard=False,
        system=False,
        report=False,
        on_nonfinite="stop",
    )
    module = Tiny()
    trainer = L.Trainer(
        max_steps=12,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 4 and cb.monitor.guard_events[0]["step"] == 4
    assert finite(module)  # step(closure): the check ran after the closure's backward


def test_hf_trainer_stops_on_the_guard(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tdiag.integrations.huggingface import TdiagCallback

    class Ids(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 64, (64, 16), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    )
    poison = {"on": False}
    model.lm_head.register_forward_hook(lambda m, a, out: out * math.nan if poison["on"] else out)

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            poison["on"] = state.global_step == 2  # the third optimizer step goes NaN

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=10,
        per_device_train_batch_size=4,
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    cb = TdiagCallback(
        run_dir=str(tmp_path / "run"),
        tensorboard=False,
        system=False,
        report=False,
        on_nonfinite="stop",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Ids(), callbacks=[Poison(), cb])
    trainer.train()
    assert trainer.state.global_step == 3 and cb.monitor.guard_events[0]["step"] == 3
    assert finite(model)


# -- escalation -----------------------------------------------------------------------------
def test_rollbacks_that_do_not_help_end_in_a_stop(tmp_path):
    model, opt = fresh()
    opts = quiet_options(tmp_path, log_every=5, on_nonfinite="rollback")
    with Monitor(model, opt, **opts) as mon:
        done = train(model, opt, 30, mon=mon, bad=tuple(range(NAN_STEP, 31)))
    actions = [(e["step"], e["action"]) for e in mon.guard_events]
    assert actions == [(7, "rollback"), (8, "rollback"), (9, "rollback"), (10, "stop")]
    assert all(e.get("restored_step", 1) == 1 for e in mon.guard_events)
    assert done == 10 and mon.should_stop and finite(model)


def test_skips_on_every_step_end_in_a_stop(tmp_path):
    model, opt = fresh()
    with Monitor(model, opt, **quiet_options(tmp_path, log_every=5, on_nonfinite="skip")) as mon:
        done = train(model, opt, 30, mon=mon, bad=tuple(range(NAN_STEP, 31)))
    assert [e["action"] for e in mon.guard_events] == ["skip"] * 9 + ["stop"]
    assert done == NAN_STEP + 9 and finite(model)


def test_on_spike_alone_adds_no_host_sync_between_log_steps(tmp_path, monkeypatch):
    tdiag_dir = str(Path(tdiag.__file__).parent)
    calls: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=original, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.startswith(tdiag_dir):
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model, opt = fresh()
    opts = quiet_options(tmp_path, log_every=100, on_spike="rollback", update_ratio=False)
    with Monitor(model, opt, **opts) as mon:
        train(model, opt, 1, mon=mon, bad=())  # step 1 is a log step
        calls.clear()
        train(model, opt, 8, mon=mon, bad=(), start=2)
        between = list(calls)
    assert between == []
    # at close: the final flush's one transfer, and the check of the weights (one flag)
    assert calls == ["tolist", "__bool__"]


def test_a_rolled_back_step_is_replayed_from_the_snapshot_before_it(tmp_path):
    model, opt = fresh()
    opts = quiet_options(
        tmp_path, log_every=5, on_nonfinite="rollback", forensics=True, loss_fn=masked_loss
    )
    with Monitor(model, opt, **opts) as mon:
        for step in range(1, 11):
            ids = batch(step, (NAN_STEP,))
            loss = masked_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss, batch=ids)
    (f,) = by_id(mon.findings, "train.nonfinite-grad")
    assert f.evidence["guard"]["action"] == "rollback"
    assert f.evidence["forensics"]["cause"] == "data", f.evidence["forensics"]
    assert f.evidence["forensics"]["step"] == NAN_STEP and finite(model)


# -- forensics go on after a recovered episode ----------------------------------------------
def _two_episodes(tmp_path, action, snapshot_every, bad=(NAN_STEP, 23), steps=30):
    model, opt = fresh()
    opts = quiet_options(
        tmp_path,
        log_every=5,
        on_nonfinite=action,
        forensics=True,
        loss_fn=masked_loss,
        snapshot_every=snapshot_every,
    )
    with Monitor(model, opt, **opts) as mon:
        for step in range(1, steps + 1):
            ids = batch(step, bad)
            loss = masked_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss, batch=ids)
    return model, mon


@pytest.mark.parametrize("snapshot_every", [5, 50])
def test_a_second_nan_episode_is_rolled_back_and_explained_too(tmp_path, snapshot_every):
    model, mon = _two_episodes(tmp_path, "rollback", snapshot_every)
    found = by_id(mon.findings, "train.nonfinite-grad")
    assert [f.step for f in found] == [NAN_STEP, 23]
    assert [f.evidence["guard"]["action"] for f in found] == ["rollback", "rollback"]
    for f, k in zip(found, (NAN_STEP, 23), strict=True):
        fx = f.evidence["forensics"]
        assert (fx["step"], fx["cause"]) == (k, "data"), fx
    # the second replay starts after the first episode: a healthy log-step snapshot (20), or
    # the first rollback's re-snapshot (7) without the discarded batch of step 7
    second = found[1].evidence["forensics"]
    assert second["snapshot_step"] == (20 if snapshot_every == 5 else NAN_STEP)
    assert second["replayed_steps"][0] == second["snapshot_step"] + 1
    # (restored_step: the snapshot it restores, by its original step: 0, taken at the start)
    assert found[1].evidence["guard"]["restored_step"] == (20 if snapshot_every == 5 else 0)
    assert finite(model) and mon.keeper.enabled and mon.forensics.replays == 2


def test_a_second_nan_episode_after_a_skip_is_explained_too(tmp_path):
    model, mon = _two_episodes(tmp_path, "skip", 50)
    found = by_id(mon.findings, "train.nonfinite-grad")
    assert [(f.step, f.evidence["guard"]["action"]) for f in found] == [(7, "skip"), (23, "skip")]
    assert [f.evidence["forensics"]["step"] for f in found] == [NAN_STEP, 23]
    assert all(f.evidence["forensics"]["cause"] == "data" for f in found)
    assert found[1].evidence["forensics"]["snapshot_step"] == NAN_STEP  # re-based at the skip
    assert finite(model) and mon.keeper.enabled


def test_one_nan_episode_is_replayed_once(tmp_path):
    model, mon = _two_episodes(tmp_path, "rollback", 5, bad=(NAN_STEP,))
    (f,) = by_id(mon.findings, "train.nonfinite-grad")
    assert f.evidence["forensics"]["step"] == NAN_STEP and mon.forensics.replays == 1
    # the loss finding of the same episode, at the log step, gets the same answer
    for g in by_id(mon.findings, "train.nonfinite-loss"):
        assert g.evidence["forensics"]["step"] == NAN_STEP
    assert finite(model) and mon.keeper.enabled


def test_without_a_guard_the_keeper_stops_after_the_first_nan(tmp_path):
    _, mon = _two_episodes(tmp_path, None, 5)
    assert mon.forensics.replays == 1 and not mon.keeper.enabled


def test_a_nan_right_after_a_rollback_is_not_blamed_on_the_discarded_batch(tmp_path):
    # step 8 fails right after the rollback of step 7: its replay starts at the re-snapshot
    # of step 7, whose own (all-padding, discarded) batch must not serve as the healthy one
    _, mon = _two_episodes(tmp_path, "rollback", 50, bad=(NAN_STEP, NAN_STEP + 1), steps=12)
    found = by_id(mon.findings, "train.nonfinite-grad")
    assert [f.step for f in found] == [NAN_STEP, NAN_STEP + 1]
    fx = found[1].evidence["forensics"]
    assert (fx["step"], fx["cause"]) == (NAN_STEP + 1, "data"), fx
    assert fx["other_step"] is None and fx["replayed_steps"] == [NAN_STEP + 1, NAN_STEP + 1]

"""Real runs that go non-finite in a known module at a known step, replayed by the Monitor:
each gets the right step, module, direction, op and cause; healthy runs raise nothing; and
the replay leaves the live training bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

from tests.forensics.runs import first_bad_step, forensics_of, loss_fn, train

FORENSICS = {"forensics": True, "loss_fn": loss_fn, "log_every": 5, "snapshot_every": 5}


def test_backward_only_nan_between_log_steps_is_found_at_its_step(tmp_path) -> None:
    # step 7 (not a log step) has an all-zero row: NormGate's sqrt backward is 0/0 there,
    # the loss stays finite; the NaN update shows up as a NaN loss at step 8, seen at step 10
    plain = train(None, steps=12, monitor=False, batch_kw={"zero_row_at": 7})
    assert first_bad_step(plain) == 7 and plain["losses"][6] == plain["losses"][6]  # finite
    run = train(tmp_path, steps=12, batch_kw={"zero_row_at": 7}, **FORENSICS)
    live = [f for f in run["monitor"].findings if f.id == "train.nonfinite-loss"]
    assert live and live[0].step == 8  # what the live run saw
    fx = forensics_of(run["monitor"])
    assert fx["step"] == 7 and fx["module"] == "gate" and fx["direction"] == "backward"
    assert fx["op"].startswith("sqrt") and fx["cause"] == "data"
    assert fx["stats"]["op_input"]["zero_frac"] > 0  # the exact zero the sqrt saw
    assert fx["stats"]["grad_in"]["finite"] == 1.0 and fx["stats"]["grad_out"]["finite"] == 0.0
    assert live[0].where == "gate"


def test_extreme_input_value_is_a_forward_data_cause(tmp_path) -> None:
    plain = train(None, steps=10, monitor=False, batch_kw={"extreme_at": 6})
    assert first_bad_step(plain) == 6
    run = train(tmp_path, steps=10, batch_kw={"extreme_at": 6}, **FORENSICS)
    fx = forensics_of(run["monitor"])
    assert (fx["step"], fx["module"], fx["direction"], fx["cause"]) == (
        6,
        "gate",
        "forward",
        "data",
    )
    assert fx["op"] == "mul"  # h * h overflows
    assert fx["stats"]["input"]["abs_max"] > 1e36 and fx["stats"]["output"]["finite"] == 0.0
    assert fx["batch_on_snapshot_bad"] is True and fx["other_batch_on_prior_state_bad"] is False


def test_weights_grown_by_a_high_lr_are_a_state_cause(tmp_path) -> None:
    plain = train(None, steps=20, lr=3.0, monitor=False)
    k = first_bad_step(plain)
    assert k is not None and k > 10  # many healthy steps first
    run = train(tmp_path, steps=20, lr=3.0, **FORENSICS)
    fx = forensics_of(run["monitor"])
    assert fx["step"] == k and fx["cause"] == "state"
    # the batch was fine on the snapshot's state, or any batch fails on the grown state
    assert fx["batch_on_snapshot_bad"] is False or fx["other_batch_on_prior_state_bad"] is True
    grown = fx["grown"]
    top = next(iter(grown))
    assert top.startswith("out.") and grown[top]["ratio"] > 100
    assert fx["grown_since_step"] < fx["snapshot_step"] or fx["snapshot_step"] == 0
    assert fx["direction"] in ("forward", "backward")


def test_a_nan_the_replay_does_not_reproduce_is_transient(tmp_path) -> None:
    plain = train(None, steps=10, monitor=False, model_kw={"flaky_at": 8})
    assert first_bad_step(plain) == 8
    run = train(tmp_path, steps=10, model_kw={"flaky_at": 8}, **FORENSICS)
    fx = forensics_of(run["monitor"])
    assert fx["cause"] == "transient" and fx["step"] is None and fx["module"] is None
    assert fx["replayed_steps"] == [6, 10]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_healthy_runs_replay_nothing(tmp_path, opt: str) -> None:
    run = train(tmp_path, steps=20, opt=opt, **FORENSICS)
    mon = run["monitor"]
    assert mon.findings == [] and mon.forensics.replays == 0
    assert mon.keeper.snapshots_taken >= 4  # step 0, then 5, 10, 15, 20
    assert mon.keeper.latest_snapshot().step == 20


def test_training_continues_bit_identically_after_a_replay(tmp_path) -> None:
    # dropout and batches drawn in the loop use the global RNG; the loop sanitises non-finite
    # gradients, so the run goes on after the NaN at step 5 (a log step: the probe sees it)
    kw = {"steps": 12, "opt": "adam", "sanitize": True, "batch_kw": {"zero_row_at": 5}}
    kw["model_kw"] = {"dropout": 0.2}
    without = train(tmp_path / "a", log_every=5, **kw)
    rng_without = torch.get_rng_state()
    with_fx = train(tmp_path / "b", **FORENSICS, **kw)
    rng_with = torch.get_rng_state()
    assert with_fx["monitor"].forensics.replays == 1
    assert forensics_of(with_fx["monitor"])["step"] == 5
    assert torch.equal(rng_with, rng_without)
    assert with_fx["losses"] == without["losses"]
    a, b = without["model"].state_dict(), with_fx["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_forensics_land_in_events_jsonl(tmp_path) -> None:
    train(tmp_path, steps=10, batch_kw={"extreme_at": 6}, **FORENSICS)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    fx = [e["evidence"]["forensics"] for e in events if "forensics" in e.get("evidence", {})]
    assert fx and fx[0]["module"] == "gate" and fx[0]["cause"] == "data"


def test_forensics_with_layer_watch_and_strict(tmp_path) -> None:
    from tdiag.monitor import NonFiniteError

    run = train(tmp_path / "w", steps=10, batch_kw={"extreme_at": 6}, watch="layers", **FORENSICS)
    fx = forensics_of(run["monitor"])
    assert (fx["step"], fx["module"], fx["cause"]) == (6, "gate", "data")
    with pytest.raises(NonFiniteError):  # strict: raised at the bad step, after the replay
        train(tmp_path / "s", steps=10, batch_kw={"extreme_at": 6}, strict=True, **FORENSICS)
    events = (tmp_path / "s" / "events.jsonl").read_text()
    assert '"cause": "data"' in events and '"module": "gate"' in events


# -- the last step, when it is not a log step -------------------------------------------------
def test_backward_only_nan_at_the_last_step_is_found_at_close(tmp_path) -> None:
    # step 12 is the last and not a log step (log_every=5): its loss is finite, its gradient
    # NaN; only the weights after its update show it, at close
    plain = train(None, steps=12, monitor=False, batch_kw={"zero_row_at": 12})
    assert first_bad_step(plain) == 12 and plain["losses"][11] == plain["losses"][11]
    run = train(tmp_path, steps=12, batch_kw={"zero_row_at": 12}, **FORENSICS)
    mon = run["monitor"]
    (f,) = [f for f in mon.findings if f.id == "train.nonfinite-grad"]
    assert f.step == 12 and "At close" in f.message and mon.status == "nonfinite"
    fx = f.evidence["forensics"]
    assert (fx["step"], fx["module"], fx["direction"], fx["cause"]) == (
        12,
        "gate",
        "backward",
        "data",
    )
    assert not [f for f in mon.findings if f.id == "train.nonfinite-loss"]


def test_the_check_at_close_runs_without_forensics_and_is_quiet_when_healthy(tmp_path) -> None:
    run = train(tmp_path / "bad", steps=12, batch_kw={"zero_row_at": 12}, log_every=5)
    (f,) = [f for f in run["monitor"].findings if f.id == "train.nonfinite-grad"]
    assert f.step == 12 and "forensics" not in f.evidence
    healthy = train(tmp_path / "ok", steps=12, log_every=5)
    assert healthy["monitor"].findings == [] and healthy["monitor"].status == "completed"

"""Live loss spikes (tdiag/monitor/spikes.py): per-step detection, ``train/loss_max``, the
report rule taking the live events, and no false alarm on a healthy run."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pandas as pd
import pytest
import torch

from tdiag import Monitor
from tdiag.monitor.spikes import SpikeDetector, loss_max
from tdiag.report.rules import evaluate

from .conftest import VOCAB, ListSink, TinyGPT, lm_loss, quiet_options

SPIKE_STEPS = (85, 86)


def pattern_batch(step: int, batch: int = 8, seq: int = 16) -> torch.Tensor:
    """Learnable rows: an arithmetic progression mod VOCAB (stride 1-3)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(seq)) % VOCAB


def pattern_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return lm_loss(model(ids), ids)


def run(tmp_path, steps: int = 120, corrupt=(), lr_jump: int | None = None, **options):
    """Train TinyGPT on the pattern; the batches of ``corrupt`` steps are random tokens; from
    step ``lr_jump`` on the LR is 30x higher."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sink = ListSink()
    losses = []
    opts = quiet_options(tmp_path, log_every=10, **options)
    with Monitor(model, opt, sinks=[sink], **opts) as mon:
        for step in range(1, steps + 1):
            ids = pattern_batch(step)
            if step in corrupt:
                g = torch.Generator().manual_seed(1000 + step)
                ids = torch.randint(0, VOCAB, ids.shape, generator=g)
            if step == lr_jump:
                for g in opt.param_groups:
                    g["lr"] *= 30
            loss = pattern_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss, tokens=ids.numel(), batch=ids)
            losses.append(loss.item())
    return mon, sink, losses


def spikes_of(findings):
    return [f for f in findings if f.id == "train.loss-spikes"]


# -- the detector ---------------------------------------------------------------------------
def noisy(n: int, seed: int, level: float = 3.0, noise: float = 0.05) -> list[float]:
    rng = random.Random(seed)
    return [level - 0.002 * i + rng.gauss(0.0, noise) for i in range(n)]


def naive_is_spike(history: list[float], x: float, z: float, rel: float) -> bool:
    """Brute force: median and MAD of differences with the statistics module."""
    base = statistics.median(history)
    diffs = [abs(b - a) for a, b in itertools.pairwise(history)]
    sigma = max(1.4826 * statistics.median(diffs) / math.sqrt(2), 1e-12 + 1e-9 * abs(base))
    return x - base > z * sigma and x - base > rel * abs(base)


def test_detector_matches_a_brute_force_reference():
    values = noisy(300, seed=1)
    for i in (60, 61, 150, 220):
        values[i] += 1.5  # spikes, one of them two steps long
    det = SpikeDetector(window=50, z=6.0, rel=0.25, min_history=20)
    found = det.observe(1, values)
    expected = [
        i + 1
        for i in range(20, len(values))
        if naive_is_spike(values[max(0, i - 50) : i], values[i], 6.0, 0.25)
    ]
    assert [s for sp in found for s in sp.steps] == expected == [61, 62, 151, 221]
    assert [sp.steps for sp in found] == [[61, 62], [151], [221]]
    assert found[0].ratio == pytest.approx(found[0].peak_value / found[0].baseline)


def test_detector_is_quiet_on_noise_and_on_a_falling_loss():
    det = SpikeDetector()
    assert det.observe(1, noisy(2000, seed=2)) == []
    falling = [4.0 * math.exp(-i / 100) + 0.5 + 0.03 * math.sin(i) for i in range(1000)]
    assert SpikeDetector().observe(1, falling) == []
    assert det.steps_judged == 2000 - 20


def test_an_episode_spanning_two_log_intervals_is_one_spike():
    det = SpikeDetector()
    values = noisy(100, seed=3)
    values[49] += 2.0
    values[50] += 2.0
    first = det.observe(1, values[:50])  # ends at step 50 with the spike open
    second = det.observe(51, values[50:])
    assert [sp.steps for sp in first] == [[50, 51]] and second == []
    assert det.episodes == 1


def test_nan_is_not_a_spike_and_ends_an_episode():
    det = SpikeDetector()
    values = noisy(60, seed=4)
    values[40] = math.nan
    values[41] = None
    assert det.observe(1, values) == []


def test_state_dict_round_trip():
    det = SpikeDetector()
    det.observe(1, noisy(40, seed=5))
    other = SpikeDetector()
    other.load_state_dict(det.state_dict())
    assert other.state_dict() == det.state_dict()
    assert other.threshold() == det.threshold()


def test_the_monitor_saves_and_restores_the_trailing_window(tmp_path):
    mon, _, _ = run(tmp_path / "a", steps=40)
    state = mon.state_dict()
    assert len(state["spikes"]["history"]) == 40
    torch.manual_seed(0)
    other = Monitor(TinyGPT(), **quiet_options(tmp_path / "b"))
    other.load_state_dict(state)
    assert other.state_dict()["spikes"] == state["spikes"]
    other.close()


@pytest.mark.parametrize(
    ("kw", "word"),
    [({"window": 2}, "spike_window"), ({"z": 0}, "spike_z"), ({"rel": -1}, "spike_rel")],
)
def test_bad_parameters_are_named(kw, word):
    with pytest.raises(ValueError, match=word):
        SpikeDetector(**kw)


def test_monitor_validates_spike_options(tmp_path, tiny_gpt):
    with pytest.raises(ValueError, match="spike_z"):
        Monitor(tiny_gpt, **quiet_options(tmp_path, spike_z=-2.0))


def test_loss_max_lets_nan_win():
    assert loss_max([1.0, None, 3.0, 2.0]) == 3.0
    assert math.isnan(loss_max([1.0, math.nan, 3.0]))
    assert loss_max([None]) is None


# -- live, in a real run --------------------------------------------------------------------
def test_two_step_spike_is_raised_live_at_its_steps(tmp_path):
    mon, sink, losses = run(tmp_path, corrupt=SPIKE_STEPS)
    (f,) = spikes_of(mon.findings)
    assert f.evidence["steps"] == list(SPIKE_STEPS) and f.step == SPIKE_STEPS[0]
    assert f.evidence["interval"] == [81, 90]
    peak = max(losses[s - 1] for s in SPIKE_STEPS)
    assert f.evidence["peak_value"] == pytest.approx(peak, rel=1e-6)
    assert f.evidence["ratio"] > 2 and f.severity.value == "warning"
    assert spikes_of(sink.events) == [f]
    # the interval's max is logged beside its mean, at the log step
    row = sink.merged()[90]
    assert row["train/loss_max"] == pytest.approx(peak, rel=1e-6)
    assert row["train/loss"] == pytest.approx(statistics.fmean(losses[80:90]), rel=1e-5)


def test_no_spike_on_the_healthy_run(tmp_path):
    mon, sink, losses = run(tmp_path)
    assert spikes_of(mon.findings) == []
    prev = 0
    for step, row in sorted(sink.merged().items()):
        if "train/loss_max" in row:  # the max over the steps since the previous log step
            assert row["train/loss_max"] == pytest.approx(max(losses[prev:step]), rel=1e-6)
            prev = step
    assert prev == 120


def test_spikes_off(tmp_path):
    mon, _, _ = run(tmp_path, corrupt=SPIKE_STEPS, spikes=False)
    assert spikes_of(mon.findings) == []


# -- the report rule takes the live events --------------------------------------------------
def _history(n: int = 30, every: int = 10) -> pd.DataFrame:
    steps = list(range(every, every * n + 1, every))
    loss = [3.0 - 0.01 * i + 0.01 * math.sin(i) for i in range(n)]
    return pd.DataFrame({"step": steps, "train/loss": loss})


def test_report_rule_reports_a_live_spike_the_means_hide(tmp_path):
    df = _history()
    assert [f for f in evaluate(df).findings if f.id == "train.loss-spikes"] == []
    mon, _, _ = run(tmp_path, corrupt=SPIKE_STEPS)
    events = [f.to_dict() for f in spikes_of(mon.findings)]
    (f,) = [f for f in evaluate(df, {}, events).findings if f.id == "train.loss-spikes"]
    assert f.evidence["steps"] == [SPIKE_STEPS[0]] and f.evidence["live_count"] == 1
    assert f.step == SPIKE_STEPS[0]


def test_report_rule_keeps_the_live_spike_over_the_logged_point_of_its_interval():
    df = _history()
    df.loc[df.step == 150, "train/loss"] = 6.0  # the interval mean of 141..150 jumps
    (plain,) = [f for f in evaluate(df).findings if f.id == "train.loss-spikes"]
    assert plain.evidence["steps"] == [150]
    event = {
        "id": "train.loss-spikes",
        "severity": "warning",
        "title": "Loss spike",
        "message": "",
        "step": 144,
        "evidence": {
            "peak_value": 20.0,
            "baseline": 2.9,
            "sigma": 0.05,
            "robust_z": 340.0,
            "ratio": 6.9,
            "interval": [141, 150],
        },
    }
    (f,) = [f for f in evaluate(df, {}, [event]).findings if f.id == "train.loss-spikes"]
    assert f.evidence["steps"] == [144] and f.evidence["worst_value"] == 20.0


# -- replayed with forensics ----------------------------------------------------------------
def test_a_bad_batch_spike_is_replayed_as_data(tmp_path):
    mon, _, _ = run(tmp_path, corrupt=SPIKE_STEPS, forensics=True, loss_fn=pattern_loss)
    (f,) = spikes_of(mon.findings)
    fx = f.evidence["forensics"]
    assert fx["kind"] == "spike" and fx["cause"] == "data", fx
    assert fx["step"] == SPIKE_STEPS[0] and fx["snapshot_step"] == 50
    assert fx["moved_first"]["statistic"] in ("attn_max_logit", "log_z", "grad_norm")
    assert f.where == fx["moved_first"]["layer"] and fx["output_moved_first"]
    assert "cause: data" in f.message
    # the replay left the live run alone: it went on and the keeper still keeps
    assert mon.global_step == 120 and mon.keeper.enabled


def test_a_spike_from_the_lr_is_replayed_as_state(tmp_path):
    mon, _, losses = run(tmp_path, lr_jump=83, forensics=True, loss_fn=pattern_loss)
    found = spikes_of(mon.findings)
    assert found, losses[78:95]
    fx = found[0].evidence["forensics"]
    assert fx["cause"] == "state", fx
    assert fx["step"] > 83
